"""The paper-protocol eval metrics on tiny fixtures whose rankings are worked out by hand in the comments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm2clip_scale.eval.multi_caption import multi_caption_recall
from llm2clip_scale.eval.ranking import hit_rates
from llm2clip_scale.eval.retrieval import retrieval_recall
from llm2clip_scale.eval.zeroshot import class_prompts, zeroshot_accuracy, zeroshot_classifier

# Scores image x caption (captions 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2). Image features are the unit
# axes, so caption j's feature vector is column j and the scores are exactly these numbers.
SCORES = torch.tensor([
    [0.90, 0.10, 0.80, 0.00, 0.20, 0.30],
    [0.50, 0.60, 0.40, 0.70, 0.10, 0.00],
    [0.00, 0.30, 0.95, 0.20, 0.60, 0.50],
])
OWNER = torch.tensor([0, 0, 1, 1, 2, 2])


def test_multi_caption_recall_hand_computed() -> None:
    metrics = multi_caption_recall(torch.eye(3), SCORES.T.contiguous(), OWNER, ks=(1, 2, 5))
    # i2t: image 0's best caption is its own caption 0 (its caption 1 ranks 5th: ANY caption counts); image 1's is its
    # caption 3; image 2's best is caption 2 (image 1's) and its own caption 4 comes 2nd.
    assert metrics["r1_i2t"] == round(2 / 3, 6) and metrics["r2_i2t"] == 1.0 and metrics["r5_i2t"] == 1.0
    # t2i: caption 1 ranks image 0 3rd (0.6, 0.3, 0.1), caption 2 ranks image 1 3rd (0.95, 0.8, 0.4); the other four
    # captions rank their own image 1st.
    assert metrics["r1_t2i"] == round(4 / 6, 6) and metrics["r2_t2i"] == round(4 / 6, 6)
    assert metrics["r5_t2i"] == 1.0
    assert metrics["num_images"] == 3 and metrics["num_captions"] == 6
    # Chunking the queries changes nothing.
    assert multi_caption_recall(torch.eye(3), SCORES.T.contiguous(), OWNER, ks=(1, 2, 5), chunk=2) == metrics


def test_multi_caption_ties_score_a_random_tie_break() -> None:
    collapsed = F.normalize(torch.ones(6, 4), dim=-1)
    images = F.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    metrics = multi_caption_recall(images, collapsed, OWNER, ks=(1, 2, 5))
    # i2t: all 6 captions tie, 2 of them correct. P(hit@1) = 2/6; P(hit@2) = 1 - (4/6)(3/5) = 0.6; at 5 the 4 wrong
    # captions cannot fill all places, so 1.
    assert metrics["r1_i2t"] == round(1 / 3, 6) and metrics["r2_i2t"] == 0.6 and metrics["r5_i2t"] == 1.0
    # t2i: each caption faces 3 different images, one correct: k / 3.
    assert metrics["r1_t2i"] == round(1 / 3, 6) and metrics["r2_t2i"] == round(2 / 3, 6)


def test_hit_rates_partial_tie_hand_computed() -> None:
    # One query over 5 keys: one wrong key above, then a block of 3 ties (1 correct, 2 wrong), then a correct key.
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.5, 0.1]])
    positives = torch.tensor([[False, True, False, False, True]])
    rates = hit_rates(scores, positives, (1, 2, 3, 4))
    # k=1: the wrong key above fills it; k=2: one place in the tie block of 3: 1/3; k=3: 1 - (2/3)(1/2) = 2/3; k=4: 1.
    assert [rates[k].item() for k in (1, 2, 3, 4)] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0], abs=1e-12)


def test_one_caption_per_image_matches_retrieval_recall() -> None:
    generator = torch.Generator().manual_seed(3)
    images = F.normalize(torch.randn(12, 8, generator=generator), dim=-1)
    texts = F.normalize(images + 0.8 * torch.randn(12, 8, generator=generator), dim=-1)
    texts[5] = texts[4]  # a tie, to hold the two implementations to the same tie rule
    single = retrieval_recall(images, texts, ks=(1, 5))
    multi = multi_caption_recall(images, texts, torch.arange(12), ks=(1, 5))
    for key in ("r1_i2t", "r5_i2t", "r1_t2i", "r5_t2i"):
        assert multi[key] == pytest.approx(single[key], abs=1e-6)


def test_multi_caption_recall_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="without any caption"):
        multi_caption_recall(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="lie in"):
        multi_caption_recall(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="one image per caption"):
        multi_caption_recall(torch.eye(3), torch.eye(3), torch.tensor([0, 1]))


def test_zeroshot_hand_computed() -> None:
    # 3 classes x 2 templates in 2-d. Class 0's prompts (3,0) and (0,1) normalise to the axes, so its class vector is
    # the diagonal (0.7071, 0.7071); averaging before normalising would give (0.949, 0.316) instead.
    prompts = torch.tensor([[[3.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 2.0]]])
    classifier = zeroshot_classifier(prompts)
    expected = torch.tensor([[0.5**0.5, 0.5**0.5], [1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(classifier, expected, atol=1e-6, rtol=0)
    images = torch.tensor([[0.5, 0.75**0.5], [1.0, 0.0], [0.8, 0.6]])
    labels = torch.tensor([0, 2, 1])
    # Image 0: class scores 0.966, 0.5, 0.866 -> class 0 first (the wrong recipe would pick class 2).
    # Image 1: 0.707, 1.0, 0.0 -> its class 2 ranks 3rd. Image 2: 0.990, 0.8, 0.6 -> its class 1 ranks 2nd.
    metrics = zeroshot_accuracy(images, classifier, labels, ks=(1, 2, 3))
    assert metrics["top1"] == round(1 / 3, 6) and metrics["top2"] == round(2 / 3, 6) and metrics["top3"] == 1.0
    assert metrics["num_samples"] == 3 and metrics["num_classes"] == 3 and metrics["chance"] == pytest.approx(1 / 3)
    # A collapsed text side (every class vector equal) scores chance, k / C.
    flat = zeroshot_accuracy(images, F.normalize(torch.ones(3, 2), dim=-1), labels, ks=(1, 2))
    assert flat["top1"] == round(1 / 3, 6) and flat["top2"] == round(2 / 3, 6)


def test_class_prompts_are_class_major_and_checked() -> None:
    assert class_prompts(["cat", "dog"], ["a {}", "the {} here"]) == ["a cat", "the cat here", "a dog", "the dog here"]
    with pytest.raises(ValueError, match="exactly one"):
        class_prompts(["cat"], ["no slot"])
    with pytest.raises(ValueError, match="distinct"):
        class_prompts(["cat", "cat"], ["a {}"])
    with pytest.raises(ValueError, match="labels must lie"):
        zeroshot_accuracy(torch.eye(2), torch.eye(2), torch.tensor([0, 2]))


def test_templates_may_hold_other_braces() -> None:
    from llm2clip_scale.eval.zeroshot import class_prompts

    assert class_prompts(["cat"], ["a {} of {kind}"]) == ["a cat of {kind}"]
