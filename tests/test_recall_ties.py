"""Retrieval recall that no tie inflates, held against clip_benchmark's own code.

The sets are written by clip_benchmark's exporter (clip_benchmark.webdataset_builder) and read back, for the
reference, by its own WebDataset reader; its recall_at_k counts the hits (its `evaluate` end to end under the
global interaction, which is what it computes). filipctl reads the same folders with its own reader and scores
them block by block (jobs/eval). Where captions repeat across images, clip_benchmark keeps tied captions in
torch.topk's order: filipctl's recall must not be above its count by more than one sample (here: never above),
while the count that takes ties as hits (filipctl's old R@K) is several samples above it on that set, so the
test tells the two apart. Without ties the counts are the same, to the bit.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jobs.eval.features import FeatureFile
from jobs.eval.scoring import retrieval
from models.filip import Encoded

KS = [1, 5, 10]
TIE = 1e-6
N_IMAGES = 20
VOCAB = ["a red shape", "a blue shape", "two shapes", "a picture of shapes"]  # repeated across images


def _captions(repeated: bool) -> list[list[str]]:
    """Each image's captions: from VOCAB (every 3rd image has a second one), or one unique caption each."""
    from jobs.data.synthetic import make_sample

    if repeated:
        return [[VOCAB[i % 4]] + ([VOCAB[(i + 1) % 4]] if i % 3 == 0 else []) for i in range(N_IMAGES)]
    return [[f"{make_sample(11, 'test', i, 64, 2)[1]} {i}"] for i in range(N_IMAGES)]


def _export(root: Path, captions: list[list[str]]) -> None:
    """The set as clip_benchmark_export_wds writes it: shapes images as PNG, the captions as given."""
    from clip_benchmark.webdataset_builder import convert_retrieval_dataset

    from jobs.data.synthetic import make_sample

    pairs = []
    for i, caps in enumerate(captions):
        buf = io.BytesIO()
        Image.open(io.BytesIO(make_sample(11, "test", i, 64, 2)[0])).convert("RGB").save(buf, format="png")
        pairs.append((buf.getvalue(), caps))
    convert_retrieval_dataset(pairs, "test", str(root), transform=None, image_format="png", max_count=7,
                              verbose=False)  # three shards


class _Pooled(torch.nn.Module):
    """FILIP's pooled embeddings behind clip_benchmark's model interface (encode_image, encode_text)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x).pooled

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids).pooled


def _clip_benchmark_loader(root: Path, image_size: int) -> torch.utils.data.DataLoader:
    """clip_benchmark's reader for wds/ sets, batched as its cli batches them."""
    from clip_benchmark.datasets.builder import build_wds_dataset

    from jobs.data.loader import image_transform

    ds = build_wds_dataset("wds/set", image_transform(image_size, augment=False), split="test", data_dir=str(root))
    return torch.utils.data.DataLoader(ds.batched(6), batch_size=None, shuffle=False, num_workers=0)


def _clip_benchmark_count(s_t2i: torch.Tensor, s_i2t: torch.Tensor, owners: list[int]) -> dict[str, float]:
    """clip_benchmark's recall_at_k over FILIP's full score matrices, [N_img, N_txt] each."""
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    positive = torch.zeros(len(owners), s_t2i.shape[0], dtype=torch.bool)  # [N_txt, N_img]
    positive[torch.arange(len(owners)), owners] = True
    out = {}
    for k in KS:
        out[f"image_retrieval_recall@{k}"] = (batchify(recall_at_k, s_t2i.T, positive, 6, "cpu", k=k) > 0).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (batchify(recall_at_k, s_i2t, positive.T, 6, "cpu", k=k) > 0).float().mean().item()
    return out


def _ties_against(s_t2i: torch.Tensor, s_i2t: torch.Tensor, owners: list[int]) -> dict[str, float]:
    """The rule, in plain loops: a hit when fewer than k negatives score at or above (within 1e-6) the best positive."""
    n_img, n_txt = s_t2i.shape
    out = {}
    for k in KS:
        hits = 0
        for i in range(n_img):
            best = max(float(s_i2t[i, j]) for j in range(n_txt) if owners[j] == i)
            hits += sum(float(s_i2t[i, j]) >= best - TIE for j in range(n_txt) if owners[j] != i) < k
        out[f"text_retrieval_recall@{k}"] = hits / n_img
        hits = 0
        for j in range(n_txt):
            true = float(s_t2i[owners[j], j])
            hits += sum(float(s_t2i[i, j]) >= true - TIE for i in range(n_img) if i != owners[j]) < k
        out[f"image_retrieval_recall@{k}"] = hits / n_txt
    return out


def _filipctl(root: Path, interaction: str, tmp: Path) -> tuple[dict, dict, list[dict], torch.Tensor, torch.Tensor,
                                                                  list[int], dict[str, float] | None]:
    """filipctl's evaluation of the exported set (a random smoke model, small scoring blocks) and the reference:
    -> (flat metrics, result file, all results, s_t2i, s_i2t, owners, clip_benchmark's `evaluate` or None)."""
    from clip_benchmark.metrics import zeroshot_retrieval

    from filipctl.recipes import load_recipe
    from jobs.eval.evaluate import Evaluation, evaluate_set
    from jobs.eval.sets import open_benchmark
    from models.filip import build_model
    from models.interaction import late_interaction
    from models.tokenizer import tokenize
    from tests.conftest import ROOT

    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", ["eval.batch_size=7", "model.similarity_memory_mb=0.05",
                                                           "eval.alignment_images=0", f"model.interaction={interaction}"])
    torch.manual_seed(0)
    model = build_model(recipe.model).eval()
    flat, results = evaluate_set(Evaluation.of(model, recipe, tmp / "features", tmp / "maps"),
                                 open_benchmark(str(root), "set", "test", False), "smoke", "x")
    ctx, size = recipe.model.text.context_length, recipe.model.image.image_size
    images, texts = [], []
    for batch_images, batch_texts in _clip_benchmark_loader(root, size):
        images.append(batch_images)
        texts += list(batch_texts)
    owners = [i for i, caps in enumerate(texts) for _ in caps]
    with torch.no_grad():
        img = model.encode_image(torch.cat(images))
        txt = model.encode_text(tokenize([c for caps in texts for c in caps], ctx))
        if interaction == "late":
            s_i2t, s_t2i = late_interaction(img.tokens, txt.tokens, img.mask, txt.mask)
        else:
            s_i2t = s_t2i = F.normalize(img.pooled, dim=-1) @ F.normalize(txt.pooled, dim=-1).T
    cb = None
    if interaction == "global":  # clip_benchmark's own evaluation: its reader, its scores, its count
        cb = zeroshot_retrieval.evaluate(_Pooled(model), _clip_benchmark_loader(root, size),
                                         lambda t: tokenize(t, ctx), "cpu", amp=False, recall_k_list=KS)
    return flat, results[0], results, s_t2i, s_i2t, owners, cb


@pytest.mark.parametrize("interaction", ["late", "global"])
def test_repeated_captions_give_no_recall_above_clip_benchmark(tmp_path: Path, interaction: str) -> None:
    captions = _captions(repeated=True)
    _export(tmp_path / "set", captions)
    flat, res, _, s_t2i, s_i2t, owners, cb_evaluate = _filipctl(tmp_path / "set", interaction, tmp_path)
    assert owners == [i for i, caps in enumerate(captions) for _ in caps]  # clip_benchmark read what was exported
    n = {"text": N_IMAGES, "image": len(owners)}
    # clip_benchmark's count over FILIP's scores; under the global interaction also its own evaluate(). On tied
    # scores the two need not agree: torch.topk's order among ties follows the matrix's layout (its evaluate ranks
    # texts in a transposed view), which is why no fixed tie order can match it and filipctl's favours no one.
    references = [_clip_benchmark_count(s_t2i, s_i2t, owners)] + ([cb_evaluate] if cb_evaluate else [])
    ours = res["metrics"]
    assert ours == _ties_against(s_t2i, s_i2t, owners)  # the rule, computed without filipctl's code
    for cb in references:
        assert ours.keys() == cb.keys()
        for key, theirs in cb.items():
            side = key.split("_", 1)[0]
            def count(x: float) -> int:  # hits (clip_benchmark's figure is a float32 mean)
                return round(x * n[side])
            assert count(ours[key]) <= count(theirs) + 1, key  # the must: at most one sample above
            assert count(ours[key]) <= count(theirs), key  # in fact never above: ties only go against the true item
            assert count(flat[f"set.{key.replace('@', '_ties_as_hits_at_')}"]) >= count(theirs), key  # the most any gives
        # The set's ties matter: counted as hits (filipctl's old count) image -> text R@1 is several samples above.
        assert round((flat["set.text_retrieval_recall_ties_as_hits_at_1"] - cb["text_retrieval_recall@1"]) * N_IMAGES) > 1
    # The result file: clip_benchmark's dataset name and float64 fractions (count / n, no float32 noise).
    assert res["dataset"] == "wds/set" and res["task"] == "zeroshot_retrieval"
    for key, value in json.loads(json.dumps(res))["metrics"].items():
        side = key.split("_", 1)[0]
        assert value == round(value * n[side]) / n[side], key


@pytest.mark.parametrize("interaction", ["late", "global"])
def test_without_ties_recalls_agree_with_clip_benchmark_to_the_bit(tmp_path: Path, interaction: str) -> None:
    import numpy as np

    _export(tmp_path / "set", _captions(repeated=False))
    flat, res, _, s_t2i, s_i2t, owners, cb_evaluate = _filipctl(tmp_path / "set", interaction, tmp_path)
    # No ties: every negative's score is more than 1e-6 away from the query's true item.
    for s in (s_t2i, s_i2t):
        pos = s.diagonal()[:, None]
        gap = (s - pos).abs() + torch.eye(len(pos)) * 1.0
        assert float(gap.min()) > 10 * TIE
    cb = _clip_benchmark_count(s_t2i, s_i2t, owners)
    if cb_evaluate is not None:
        assert cb_evaluate == cb
    ours = res["metrics"]
    # clip_benchmark writes float32 means; filipctl count / n in float64: the same bits once rounded to float32.
    assert {k: float(np.float32(v)) for k, v in ours.items()} == cb
    assert ours == {k: round(v * N_IMAGES) / N_IMAGES for k, v in cb.items()}
    assert {k: flat[f"set.{k.replace('@', '_ties_as_hits_at_')}"] for k in ours} == ours  # nothing ties
    assert 0 < ours["text_retrieval_recall@1"] < 1 or 0 < ours["text_retrieval_recall@5"] < 1  # not trivial


def _unit(*axes: int, d: int = 8) -> list[float]:
    v = [0.0] * d
    for a in axes:
        v[a] = 1.0
    return F.normalize(torch.tensor(v), dim=0).tolist()


def _pooled_file(tmp: Path, name: str, rows: list[list[float]]) -> FeatureFile:
    x = torch.tensor(rows)[:, None, :]  # one token: the global interaction reads only the pooled vector
    f = FeatureFile(tmp, name)
    f.append(Encoded(x, torch.ones(len(rows), 1, dtype=torch.bool), x[:, 0]))
    return f.close()


def test_hand_counted_ties(tmp_path: Path) -> None:
    """Six images, seven captions with known ties (global interaction: s = image . caption, exact here).

    Captions A = e0, B = e1, C = e2; a caption text repeated is the same vector.
        image 0 = e0          captions: c0 = A
        image 1 = (e0+e3)/r2            c1 = A
        image 2 = (e0+e4)/r2            c2 = A
        image 3 = e1                    c3 = B
        image 4 = (e1+e5)/r2            c4 = B
        image 5 = e2                    c5 = C, c6 = A (two captions)
    Image -> text, negatives at or above the best caption (strictly above in brackets):
        0: c1 c2 c6 = 3 (0); 1: c0 c2 c6 = 3 (0); 2: 3 (0); 3: c4 = 1 (0); 4: c3 = 1 (0); 5: 0 (0)
    Text -> image, negative images at or above the caption's image:
        c0: 0 (0); c1: img0, img2 = 2 (img0: 1); c2: 2 (1); c3: 0 (0); c4: img3 = 1 (1); c5: 0 (0);
        c6 (scores 0 with image 5): img0-2 above, img3-4 tied at 0 = 5 (3)
    """
    r = 2 ** -0.5
    images = _pooled_file(tmp_path, "i", [_unit(0), _unit(0, 3), _unit(0, 4), _unit(1), _unit(1, 5), _unit(2)])
    a, b, c = _unit(0), _unit(1), _unit(2)
    texts = _pooled_file(tmp_path, "t", [a, a, a, b, b, c, a])
    owners = torch.tensor([0, 1, 2, 3, 4, 5, 5])
    got = retrieval(images, texts, owners, "global", memory_mb=0.01, block=4, ks=[1, 2, 4])
    assert got.clip_benchmark == {
        "image_retrieval_recall@1": 3 / 7, "text_retrieval_recall@1": 1 / 6,
        "image_retrieval_recall@2": 4 / 7, "text_retrieval_recall@2": 3 / 6,
        "image_retrieval_recall@4": 6 / 7, "text_retrieval_recall@4": 6 / 6}
    assert got.ties_as_hits == {
        "image_retrieval_recall_ties_as_hits@1": 3 / 7, "text_retrieval_recall_ties_as_hits@1": 6 / 6,
        "image_retrieval_recall_ties_as_hits@2": 6 / 7, "text_retrieval_recall_ties_as_hits@2": 6 / 6,
        "image_retrieval_recall_ties_as_hits@4": 7 / 7, "text_retrieval_recall_ties_as_hits@4": 6 / 6}
    # clip_benchmark's count on the same matrix, whatever order its topk leaves ties in: never below filipctl's.
    s = torch.tensor([_unit(0), _unit(0, 3), _unit(0, 4), _unit(1), _unit(1, 5), _unit(2)]) @ torch.tensor(
        [a, a, a, b, b, c, a]).T  # [6, 7]
    assert float(s[1, 0]) == float(s[2, 0]) == pytest.approx(r)  # the ties are exact
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k

    positive = torch.zeros(7, 6, dtype=torch.bool)
    positive[torch.arange(7), owners] = True
    for k in (1, 2, 4):
        assert got.clip_benchmark[f"image_retrieval_recall@{k}"] <= (recall_at_k(s.T, positive, k) > 0).float().mean()
        assert got.clip_benchmark[f"text_retrieval_recall@{k}"] <= (recall_at_k(s, positive.T, k) > 0).float().mean()


def test_zero_shot_fractions_are_clip_benchmarks_python_floats() -> None:
    """acc1/acc5 are count / n as clip_benchmark's accuracy() writes them (89/120 = 0.7416666666666667, where a
    float32 mean gives 0.7416666746139526). Its accuracy() itself cannot run here: it calls float() on a
    1-element array, which this numpy refuses; its arithmetic is float(the float32 count) / n."""
    from jobs.eval.scoring import classification

    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 10, (120,), generator=g)
    scores = torch.randn(120, 10, generator=g)
    right = torch.randperm(120, generator=g)[:89]  # exactly 89 images scored right at top 1
    scores[right, labels[right]] = 10.0
    scores[torch.arange(120), labels] -= 20.0 * ~torch.isin(torch.arange(120), right)
    got = classification(scores, labels)
    assert got["acc1"] == 89 / 120 == 0.7416666666666667
    top = scores.topk(5, dim=1).indices
    assert got["acc1"] == float((top[:, 0] == labels).float().sum()) / 120  # to the bit
    assert got["acc5"] == float((top == labels[:, None]).any(1).float().sum()) / 120
    assert 89 / 120 != float((top[:, 0] == labels).float().mean())  # what a float32 mean would have written
