import sys

from llm2clip_scale.cli import main

# The guard matters: megatron's dist_checkpointing spawns helper processes that re-import __main__.
if __name__ == "__main__":
    sys.exit(main())
