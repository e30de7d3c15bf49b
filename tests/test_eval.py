"""Evaluation figures against independent computations: plain loops over full score matrices, sklearn directly.

The feature files, block scoring, readers of both layouts and the probe's C search are filipctl's;
every expected number here is computed another way (the reference late interaction that
materialises every token pair, python loops over sorted scores).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from filipctl.contract import JobError
from jobs.eval import alignment
from jobs.eval.features import FeatureFile
from jobs.eval.scoring import class_scores, classification, retrieval
from jobs.eval.sets import batches, held_out_set, open_benchmark
from jobs.eval.linear_probe import linear_probe
from jobs.data.shards import ErrorLog
from models.filip import Encoded
from models.interaction import global_similarity, late_interaction
from tests.benchmark_sets import classification_set, retrieval_set, write_split


def _encoded(n: int, tokens: int, d: int, seed: int, pad: bool = False) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    t = F.normalize(torch.randn(n, tokens, d, generator=g), dim=-1)
    mask = torch.ones(n, tokens, dtype=torch.bool)
    if pad:  # captions of different lengths
        for i in range(n):
            mask[i, 2 + i % (tokens - 2):] = False
    return Encoded(t, mask, t[:, 0])


def _file(tmp: Path, name: str, enc: Encoded, batch: int = 7) -> FeatureFile:
    f = FeatureFile(tmp, name)
    for i in range(0, len(enc.tokens), batch):
        f.append(Encoded(enc.tokens[i : i + batch], enc.mask[i : i + batch], enc.pooled[i : i + batch]))
    return f.close()


def _full_scores(img: Encoded, txt: Encoded, interaction: str) -> tuple[torch.Tensor, torch.Tensor]:
    if interaction == "late":
        return late_interaction(img.tokens, txt.tokens, img.mask, txt.mask)
    return global_similarity(img.pooled, txt.pooled)


@pytest.mark.parametrize("interaction", ["late", "global"])
def test_retrieval_with_several_captions_per_image_matches_a_plain_loop(tmp_path: Path, interaction: str) -> None:
    n_img = 23
    per_image = [5 if i % 4 else 1 for i in range(n_img)]  # mostly 5 captions, some images with one
    owners = [i for i, n in enumerate(per_image) for _ in range(n)]
    img = _encoded(n_img, 9, 16, seed=1)
    txt = _encoded(len(owners), 6, 16, seed=2, pad=True)
    # Make the task learnable-looking: each caption leans towards its image so recalls are not all tiny.
    txt = Encoded(F.normalize(txt.tokens + 0.6 * img.tokens[owners, :6], dim=-1), txt.mask,
                  F.normalize(txt.pooled + 0.6 * img.pooled[owners], dim=-1))
    got = retrieval(_file(tmp_path, "i", img), _file(tmp_path, "t", txt), torch.tensor(owners), interaction,
                    memory_mb=0.01, block=5, ks=[1, 5, 10])

    s_i2t, s_t2i = _full_scores(img, txt, interaction)  # [N_img, N_txt]
    expected = {}
    for k in (1, 5, 10):
        hits = 0  # image -> text: at least one of the image's captions among its k best texts
        for i in range(n_img):
            order = sorted(range(len(owners)), key=lambda j: -float(s_i2t[i, j]))
            hits += any(owners[j] == i for j in order[:k])
        expected[f"text_retrieval_recall@{k}"] = hits / n_img
        hits = 0  # text -> image: the caption's image among its k best images
        for j in range(len(owners)):
            order = sorted(range(n_img), key=lambda i: -float(s_t2i[i, j]))
            hits += owners[j] in order[:k]
        expected[f"image_retrieval_recall@{k}"] = hits / len(owners)
    # random features: no two scores of a query within 1e-6, so ties decide nothing and both counts agree
    assert got.clip_benchmark == expected  # to the bit: count / n as Python floats
    assert got.ties_as_hits == {k.replace("@", "_ties_as_hits@"): v for k, v in expected.items()}
    assert 0 < expected["text_retrieval_recall@1"] < 1  # neither trivial nor impossible


@pytest.mark.parametrize("interaction", ["late", "global"])
def test_zero_shot_prompt_ensemble_matches_a_plain_loop(tmp_path: Path, interaction: str) -> None:
    n_img, n_classes, n_templates = 31, 7, 3
    img = _encoded(n_img, 9, 16, seed=3)
    prompts = _encoded(n_classes * n_templates, 6, 16, seed=4, pad=True)  # template-major
    labels = torch.tensor([i % n_classes for i in range(n_img)])
    scores = class_scores(_file(tmp_path, "i", img), _file(tmp_path, "p", prompts), n_classes, interaction,
                          memory_mb=0.01, block=4)
    s_i2t, _ = _full_scores(img, prompts, interaction)
    for i in range(n_img):
        for c in range(n_classes):
            mean = sum(float(s_i2t[i, t * n_classes + c]) for t in range(n_templates)) / n_templates
            assert float(scores[i, c]) == pytest.approx(mean, abs=1e-5)
    got = classification(scores, labels)
    top1 = top5 = 0
    recall_per_class: dict[int, list[int]] = {}
    for i in range(n_img):
        order = sorted(range(n_classes), key=lambda c: -float(scores[i, c]))
        top1 += order[0] == labels[i]
        top5 += int(labels[i]) in order[:5]
        recall_per_class.setdefault(int(labels[i]), []).append(int(order[0] == labels[i]))
    assert got["acc1"] == pytest.approx(top1 / n_img)
    assert got["acc5"] == pytest.approx(top5 / n_img)
    assert got["mean_per_class_recall"] == pytest.approx(np.mean([np.mean(v) for v in recall_per_class.values()]))
    assert classification(scores[:, :4], labels.clamp(max=3))["acc5"] is None  # under 5 classes, as clip_benchmark


def test_linear_probe_picks_the_best_validated_c_and_scores_like_sklearn() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 10))
    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 6, n)
        return centres[y] + 1.5 * rng.normal(size=(n, 10)), y
    train_x, train_y = draw(150)
    val_x, val_y = draw(60)
    test_x, test_y = draw(90)
    got = linear_probe(train_x, train_y, test_x, test_y, val_x, val_y, seed=0)
    # The chosen C is at least as good on validation as every C of the coarse grid.
    for c in np.logspace(-6, 6, 7):
        acc = (LogisticRegression(C=c, max_iter=1000, random_state=0).fit(train_x, train_y).predict(val_x) == val_y).mean()
        assert got["val_acc1"] >= acc - 1e-12
    final = LogisticRegression(C=got["C"], max_iter=1000, random_state=0).fit(np.concatenate([train_x, val_x]),
                                                                             np.concatenate([train_y, val_y]))
    pred = final.predict(test_x)
    assert got["lp_acc1"] == pytest.approx((pred == test_y).mean())
    per_class = [np.mean(pred[test_y == c] == c) for c in np.unique(test_y)]
    assert got["lp_mean_per_class_recall"] == pytest.approx(np.mean(per_class))
    assert got["lp_acc1"] > 0.5  # separable enough to be learnt: the figure is not noise


def test_clip_benchmark_layouts_are_read_as_written(tmp_path: Path) -> None:
    classes = classification_set(tmp_path / "cls", {"train": 20, "test": 11}, fmt="webp",
                                 templates=["a photo of a {c}.", "art of the {c}."], per_shard=4)
    ds = open_benchmark(str(tmp_path / "cls"), None, "test", linear_probe=True)
    assert ds.name == "cls" and ds.classnames == classes and ds.templates == ["a photo of a {c}.", "art of the {c}."]
    assert ds.linear_probe and set(ds.splits) == {"test", "train"} and len(ds.splits["test"]) == 3
    problems = ErrorLog()
    got = [b for b in batches(ds, "test", 32, 4, problems)]
    labels = [label for b in got for label in b.labels]
    from jobs.data.synthetic import make_sample
    assert labels == [make_sample(7, "test", i, 64, 2)[2]["label"] for i in range(11)]
    assert [b.images.shape[0] for b in got] == [4, 4, 3] and got[0].images.shape[1:] == (3, 32, 32)

    caps = retrieval_set(tmp_path / "ret", 9, captions_per_image=3, fmt="png", per_shard=5)
    (tmp_path / "ret" / "test" / "nshards.txt").unlink()  # without nshards.txt: every .tar of the split
    ret = open_benchmark(str(tmp_path / "ret"), "flickr_like", "test", linear_probe=True)
    assert ret.kind == "retrieval" and ret.captions and not ret.linear_probe and ret.name == "flickr_like"
    read = [c for b in batches(ret, "test", 32, 4, ErrorLog()) for c in b.captions]
    assert read == caps and all(len(c) == 3 for c in read)


def test_bad_sets_are_named_with_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(JobError, match=r"no split 'test' at .*nothing/test"):
        open_benchmark(str(tmp_path / "nothing"), None, "test", True)
    root = tmp_path / "nonames"
    write_split(root / "test", [{"png": b"x", "cls": b"0"}], 4)
    with pytest.raises(JobError, match="classnames.txt is missing"):
        open_benchmark(str(root), None, "test", True)
    (root / "classnames.txt").write_text("cat\ndog\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a cat\n")
    with pytest.raises(JobError, match=r"template 'a photo of a cat' .* has no '\{c\}'"):
        open_benchmark(str(root), None, "test", True)
    (root / "dataset_type.txt").write_text("multilabel\n")
    with pytest.raises(JobError, match="multilabel sets are not supported"):
        open_benchmark(str(root), None, "test", True)
    # A sample whose class is out of range, and one that is not an image: counted and named, the rest read.
    bad = tmp_path / "bad"
    classification_set(bad, {"test": 3}, per_shard=8)
    ok = (bad / "test" / "0.tar").read_bytes()
    write_split(bad / "test", [{"png": b"not an image", "cls": b"1"}, {"webp": b"", "cls": b"99"}], 8)
    (bad / "test" / "1.tar").write_bytes(ok)
    (bad / "test" / "nshards.txt").write_text("2\n")
    problems = ErrorLog()
    labels = [x for b in batches(open_benchmark(str(bad), None, "test", False), "test", 32, 8, problems) for x in b.labels]
    assert len(labels) == 3 and problems.count == 2
    # A shard nshards.txt names but that cannot be read stops the evaluation: part of a set is not the set.
    (bad / "test" / "nshards.txt").write_text("3\n")
    with pytest.raises(JobError, match=r"eval set bad: cannot read .*test/2.tar"):
        list(batches(open_benchmark(str(bad), None, "test", False), "test", 32, 8, ErrorLog()))
    (bad / "test" / "nshards.txt").write_text("0\n")
    with pytest.raises(JobError, match="says 0 shards"):
        open_benchmark(str(bad), None, "test", False)


def test_probe_splits_are_looked_for_only_when_a_probe_runs(tmp_path: Path) -> None:
    retrieval_set(tmp_path / "ret", 4, per_shard=4)
    (tmp_path / "ret" / "train").mkdir()  # an empty folder a retrieval set does not use
    assert set(open_benchmark(str(tmp_path / "ret"), None, "test", True).splits) == {"test"}
    classification_set(tmp_path / "cls", {"test": 4, "val": 4}, per_shard=4)
    (tmp_path / "cls" / "train").mkdir()  # empty: no probe, and the zero-shot evaluation still runs
    ds = open_benchmark(str(tmp_path / "cls"), None, "test", True)
    assert set(ds.splits) == {"test", "val"} and not ds.linear_probe
    assert set(open_benchmark(str(tmp_path / "cls"), None, "test", False).splits) == {"test"}


def test_blank_class_names_keep_their_index_as_clip_benchmark_reads_them() -> None:
    from jobs.eval.sets import _classnames

    assert _classnames("cat\n\ndog\n\n") == ["cat", "", "dog"]


def test_pointing_hits_when_the_word_matches_a_patch_in_the_box() -> None:
    grid, size, d = 4, 64, 8
    centres = alignment.patch_centres(grid, size)
    image = F.normalize(torch.randn(1 + grid * grid, d, generator=torch.Generator().manual_seed(0)), dim=-1)
    prompt = F.normalize(torch.randn(5, d, generator=torch.Generator().manual_seed(1)), dim=-1)
    prompt[2] = image[1 + 5]  # the colour word is patch 5 (row 1, col 1: centre (24, 24))
    prompt[3] = image[1 + 15]  # the shape word is patch 15 (row 3, col 3: centre (56, 56))
    p = alignment.Pointing()
    p.add(image, prompt, {"colour": 2, "shape": 3}, [16, 16, 32, 32], [[48, 48, 64, 64]], centres)
    m = p.metrics()
    assert m["pointing_colour"] == 1.0 and m["pointing_shape"] == 0.0 and m["pointing_acc"] == 0.5
    assert m["pointing_on_any_object"] == 1.0  # the shape word pointed at the other object
    assert m["pointing_chance"] == pytest.approx(1 / 16)  # one patch centre of 16 inside the box


def test_word_positions_in_a_prompt() -> None:
    from models.tokenizer import tokenize

    ids = tokenize(["a photo of a purple triangle."], 32)[0]
    words = alignment.token_strings(ids, 32)
    assert words[0] == "<start>" and words[-1] == "<end>"
    assert words[alignment.word_position(ids, "purple", 32)] == "purple"
    assert words[alignment.word_position(ids, "triangle", 32)] == "triangle"
    assert alignment.word_position(ids, "circle", 32) is None


def test_held_out_split_reads_captions_labels_and_boxes(tmp_path: Path) -> None:
    from filipctl.schema import SyntheticData
    from jobs.data.index import read_classnames, resolve_shards
    from jobs.data.synthetic import generate

    generate(str(tmp_path / "train"), str(tmp_path / "eval"), SyntheticData(train_samples=4, eval_samples=6,
             samples_per_shard=4, image_size=32, max_objects=2, seed=3))
    shards = resolve_shards(str(tmp_path / "eval"))
    ds = held_out_set({"url": str(tmp_path / "eval"), "shards": shards, "classnames": read_classnames(shards)})
    got = list(batches(ds, "test", 32, 4, ErrorLog(), keep_raw=2))
    assert sum(len(b.captions) for b in got) == 6 and all(len(c) == 1 for b in got for c in b.captions)
    assert len(got[0].raw) == 2 and not got[1].raw
    assert all(o["box"] for b in got for m in b.meta for o in m["objects"])
    assert json.loads(json.dumps(got[0].labels)) == got[0].labels


def test_a_set_on_s3_is_read_like_a_local_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """clip_benchmark layout in a bucket of a moto S3 server on 127.0.0.1, read through fsspec/s3fs."""
    import s3fs
    from moto.server import ThreadedMotoServer

    from filipctl.contract import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
               "AWS_DEFAULT_REGION": "us-east-1"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        classification_set(tmp_path / "wds_cls", {"test": 6}, per_shard=4, templates=["a {c}."])
        fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"])
        fs.mkdir("bench")
        fs.put(str(tmp_path / "wds_cls"), "bench/wds_cls", recursive=True)
        s3fs.S3FileSystem.clear_instance_cache()
        ds = open_benchmark("s3://bench/wds_cls", None, "test", True)
        assert ds.name == "wds_cls" and ds.templates == ["a {c}."] and ds.splits["test"][0] == "s3://bench/wds_cls/test/0.tar"
        local = open_benchmark(str(tmp_path / "wds_cls"), None, "test", True)
        remote = [x for b in batches(ds, "test", 16, 4, ErrorLog()) for x in b.labels]
        assert remote == [x for b in batches(local, "test", 16, 4, ErrorLog()) for x in b.labels] and len(remote) == 6
    finally:
        server.stop()


def test_hard_negatives_differ_in_exactly_one_attribute() -> None:
    from jobs.eval.hard_negatives import FineGrained, hard_negatives
    from jobs.data.synthetic import caption_of

    objects = [{"colour": "red", "shape": "circle", "position": "top left"},
               {"colour": "blue", "shape": "square", "position": "center"}]
    negs = hard_negatives(objects, "7/x")
    assert negs == hard_negatives(objects, "7/x")  # seeded by the key
    true = caption_of(objects)
    assert len(negs["colour"]) == 4 and len(negs["shape"]) == 2 and len(negs["position"]) == 7
    for attribute, captions in negs.items():
        assert len(set(captions)) == len(captions) and true not in captions
        for cap in captions:
            # Exactly one object's attribute changed: re-derive it by trying every single change.
            singles = {caption_of([{**o, attribute: v} if i == j else o for i, o in enumerate(objects)])
                       for j in range(2) for v in ("red", "green", "blue", "yellow", "purple", "orange", "circle",
                                                    "square", "triangle", "top", "left", "right", "bottom", "center",
                                                    "top right", "bottom left", "bottom right", "top left")}
            assert cap in singles, (attribute, cap)
    assert not any("red" in c.split(" and ")[1] for c in negs["colour"])  # no colour the image already has

    fg = FineGrained()
    fg.add(0.9, {"colour": [0.1, 0.2], "shape": [0.95], "position": [0.3]})
    fg.add(0.5, {"colour": [0.5], "shape": [0.1], "position": [0.2]})  # a tie is not a win
    m = fg.metrics()
    assert m["finegrained_R1"] == 0.0 and m["finegrained_colour_R1"] == 0.5 and m["finegrained_shape_R1"] == 0.5
    assert m["finegrained_position_R1"] == 1.0 and m["chance_finegrained_colour_R1"] == pytest.approx(1 / 2.5)


def _tar_samples(folder: Path) -> list[dict[str, bytes]]:
    """Every sample of a split's shards in order, read with plain tarfile (not filipctl's reader)."""
    import tarfile

    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(f"{shard.name}/{key}", {})[ext] = tar.extractfile(m).read()
    return list(samples.values())


def test_whole_evaluation_of_both_layouts_matches_an_independent_computation(tmp_path: Path) -> None:
    """jobs.eval.evaluate on a random model, tiny sets in clip_benchmark's and img2dataset's layouts, small scoring blocks,
    against: images decoded from the tars directly, one forward pass, the reference late interaction over the
    full score matrix, plain loops."""
    import io

    from PIL import Image

    from filipctl.recipes import load_recipe
    from filipctl.schema import SyntheticData
    from jobs.data.index import read_classnames, resolve_shards
    from jobs.eval.evaluate import Evaluation, evaluate_set
    from jobs.eval.prompts import class_templates
    from jobs.eval.hard_negatives import ATTRIBUTES, hard_negatives
    from jobs.data.loader import image_transform
    from jobs.data.synthetic import caption_of, generate
    from models.filip import build_model
    from models.tokenizer import tokenize
    from tests.conftest import ROOT

    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", ["eval.batch_size=7", "model.similarity_memory_mb=0.05",
                                                           "eval.alignment_images=2"])
    torch.manual_seed(0)
    model = build_model(recipe.model).eval()
    enc = Evaluation.of(model, recipe, tmp_path / "features", tmp_path / "maps")
    transform = image_transform(recipe.model.image.image_size, augment=False)
    ctx = recipe.model.text.context_length

    def images_of(samples: list[dict[str, bytes]]) -> Encoded:
        pics = [transform(Image.open(io.BytesIO(next(v for k, v in s.items() if k in ("jpg", "png", "webp"))))
                          .convert("RGB")) for s in samples]
        with torch.no_grad():
            return model.encode_image(torch.stack(pics))

    def texts_of(texts: list[str]) -> Encoded:
        with torch.no_grad():
            return model.encode_text(tokenize(texts, ctx))

    def li(i: Encoded, t: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        return late_interaction(i.tokens, t.tokens, i.mask, t.mask)

    def recall(s: torch.Tensor, owners: list[int], k: int, by_image: bool) -> float:
        """s [N_img, N_txt]; by_image: image -> text (any caption of the image in its top k). Ties go against the
        true item (a caption repeated across images of the held-out split scores the same for each of them)."""
        hits = 0
        if by_image:
            for i in range(s.shape[0]):
                best = max(float(s[i, j]) for j in range(s.shape[1]) if owners[j] == i)
                hits += sum(float(s[i, j]) >= best - 1e-6 for j in range(s.shape[1]) if owners[j] != i) < k
            return hits / s.shape[0]
        for j in range(s.shape[1]):
            true = float(s[owners[j], j])
            hits += sum(float(s[i, j]) >= true - 1e-6 for i in range(s.shape[0]) if i != owners[j]) < k
        return hits / s.shape[1]

    # clip_benchmark retrieval: 12 images x 3 captions.
    caps = retrieval_set(tmp_path / "ret", 12, captions_per_image=3, per_shard=5)
    flat, _ = evaluate_set(enc, open_benchmark(str(tmp_path / "ret"), None, "test", False), "smoke", "x")
    img = images_of(_tar_samples(tmp_path / "ret" / "test"))
    owners = [i for i, c in enumerate(caps) for _ in c]
    s_i2t, s_t2i = li(img, texts_of([c for cs in caps for c in cs]))
    for k in (1, 5, 10):
        assert flat[f"ret.text_retrieval_recall_at_{k}"] == pytest.approx(recall(s_i2t, owners, k, True), abs=1e-6)
        assert flat[f"ret.image_retrieval_recall_at_{k}"] == pytest.approx(recall(s_t2i, owners, k, False), abs=1e-6)

    # clip_benchmark classification: zero-shot over its own two templates, and the linear probe.
    classification_set(tmp_path / "cls", {"train": 30, "test": 14}, templates=["a photo of a {c}.", "a {c} here."],
                       per_shard=6)
    ds = open_benchmark(str(tmp_path / "cls"), None, "test", True)
    flat, results = evaluate_set(enc, ds, "smoke", "x")
    test = _tar_samples(tmp_path / "cls" / "test")
    labels = [int(s["cls"]) for s in test]
    img = images_of(test)
    scores = torch.zeros(len(test), len(ds.classnames))
    for template in ["a photo of a {c}.", "a {c} here."]:
        txt = texts_of([template.replace("{c}", c) for c in ds.classnames])
        scores += li(img, txt)[0] / 2
    pred = [max(range(scores.shape[1]), key=lambda c: float(scores[i, c])) for i in range(len(test))]
    assert flat["cls.acc1"] == pytest.approx(np.mean([p == y for p, y in zip(pred, labels)]))
    per_class = [np.mean([p == y for p, y in zip(pred, labels) if y == c]) for c in sorted(set(labels))]
    assert flat["cls.mean_per_class_recall"] == pytest.approx(np.mean(per_class))
    from sklearn.linear_model import LogisticRegression

    train = _tar_samples(tmp_path / "cls" / "train")
    def feats(e: Encoded) -> np.ndarray:  # eval.probe_features auto under late interaction: mean of the tokens
        return (e.tokens * e.mask[..., None]).sum(1).div(e.mask.sum(1, keepdim=True)).numpy()
    clf = LogisticRegression(C=flat["cls.C"], max_iter=1000, random_state=0).fit(
        feats(images_of(train)), [int(s["cls"]) for s in train])
    assert flat["cls.lp_acc1"] == pytest.approx(np.mean(clf.predict(feats(img)) == np.array(labels)))
    assert {r["task"] for r in results} == {"zeroshot_classification", "linear_probe"}

    # The held-out split in img2dataset's layout: retrieval, zero-shot with the recipe's prompts, fine-grained.
    generate(str(tmp_path / "tr"), str(tmp_path / "ev"), SyntheticData(train_samples=2, eval_samples=16,
             samples_per_shard=6, image_size=64, max_objects=2, seed=5))
    shards = resolve_shards(str(tmp_path / "ev"))
    held = held_out_set({"url": str(tmp_path / "ev"), "shards": shards, "classnames": read_classnames(shards)})
    flat, _ = evaluate_set(enc, held, "smoke", "x")
    samples = _tar_samples(tmp_path / "ev")
    metas = [json.loads(s["json"]) for s in samples]
    img = images_of(samples)
    s_i2t, s_t2i = li(img, texts_of([s["txt"].decode() for s in samples]))
    one_each = list(range(len(samples)))
    for k in (1, 5, 10):
        assert flat[f"i2t_R{k}"] == pytest.approx(recall(s_i2t, one_each, k, True), abs=1e-6)
        assert flat[f"t2i_R{k}"] == pytest.approx(recall(s_t2i, one_each, k, False), abs=1e-6)
    templates = class_templates(held, recipe.eval)
    scores = sum(li(img, texts_of([t.replace("{c}", c) for c in held.classnames]))[0]
                 for t in templates) / len(templates)
    pred = scores.argmax(1).tolist()
    assert flat["zeroshot_top1"] == pytest.approx(np.mean([p == m["label"] for p, m in zip(pred, metas)]))
    wins = [0, 0]  # ranked by s^I, by s^T
    for i, m in enumerate(metas):
        negs = hard_negatives(m["objects"], f"{i}/{caption_of(m['objects'])}")
        texts = [caption_of(m["objects"])] + [c for a in ATTRIBUTES for c in negs[a]]
        both = li(Encoded(img.tokens[i : i + 1], img.mask[i : i + 1], img.pooled[i : i + 1]), texts_of(texts))
        for d, s in enumerate(both):
            wins[d] += all(float(s[0, 0]) > float(x) for x in s[0, 1:])
    assert flat["finegrained_R1"] == pytest.approx(wins[0] / len(metas))
    assert flat["finegrained_sT_R1"] == pytest.approx(wins[1] / len(metas))
    assert len(list((tmp_path / "maps" / "held_out").glob("*.png"))) == 2
