"""Target-free choice among candidate UAPs (abd_fast.defenses.select, `uap-select`): the
capture gain of the poisoned model over the reference, on toy models whose behaviour is
known, and the command's outputs on a tiny victim."""
import json
import re

import pytest
import torch
from torch import nn

from abd_fast.defenses.select import capture, choose, score_uaps
from abd_fast.defenses.uap import UAP, patch_geometry

S, C = 16, 4
NAMES = ["circle", "star", "ring", "square"]


class Toy(nn.Module):
    """A 'CLIP' whose image feature is one-hot: the class of the image's brightest channel
    (0-2), or class `backdoor` when the bottom-right corner patch is black (a backdoor that
    only this model has). Text features: one-hot of the class index in the prompt."""

    def __init__(self, backdoor=None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.backdoor = backdoor

    def encode_image(self, x):
        f = torch.zeros(len(x), C)
        f[torch.arange(len(x)), x.mean((2, 3)).argmax(1)] = 1
        if self.backdoor is not None:
            side, corner = patch_geometry(S)
            dark = x[:, :, corner:corner + side, corner:corner + side].amax((1, 2, 3)) < -0.5
            f[dark] = 0
            f[dark, self.backdoor] = 1
        return f + 0 * self.w

    def encode_text(self, tokens):
        return nn.functional.one_hot(tokens[:, 0], C).float() + 0 * self.w


def tokenizer(prompts):
    return torch.tensor([[next(i for i, n in enumerate(NAMES) if re.search(rf"\b{n}\b", p))]
                         for p in prompts])


def test_capture_counts_only_images_not_already_in_the_class():
    clean = torch.tensor([0, 0, 1, 2, 3, 3])
    adv = torch.tensor([3, 0, 3, 3, 3, 1])
    cap = capture(clean, adv, C)
    assert cap[3].item() == pytest.approx(100 * 3 / 4)   # 3 of the 4 non-3 images
    assert cap[0].item() == pytest.approx(100 * 0 / 5)   # image 1 was 0 already
    assert cap[1].item() == pytest.approx(100 * 1 / 5)


def test_the_backdoor_uap_wins_and_the_shared_attractor_scores_nothing():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 3, S, S), dtype=torch.uint8)
    side = patch_geometry(S)[0]
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    # a black corner patch: the poisoned model's backdoor (class 3), the reference ignores it;
    # a red-flooding L-inf UAP: class 0 on both models (a natural attractor)
    backdoor = UAP(torch.zeros(3, side, side), mode="patch", image_size=S)
    red = torch.zeros(3, S, S)
    red[0], red[1:] = 0.9, -0.9
    attractor = UAP(red, mode="linf", image_size=S, eps=0.9)
    scores = score_uaps({"linf": attractor, "corner": backdoor}, Toy(backdoor=3), Toy(), images,
                        NAMES, tokenizer=tokenizer, mean=mean, std=std)
    by = {s["name"]: s for s in scores}
    assert by["corner"]["top_class"] == "square" and by["corner"]["score"] == 100.0
    assert by["linf"]["capture"]["circle"] == 100.0             # collapses both models ...
    assert by["linf"]["reference_capture"]["circle"] == 100.0   # ... so it gains nothing
    assert by["linf"]["score"] < 1 and by["linf"]["most_captured"]["poisoned"] == "circle"
    assert choose(scores)["name"] == "corner"
    with pytest.raises(ValueError, match="no candidate"):
        choose([])
    # --criterion scan: the gain read on the class the scan suspects, whatever gains elsewhere
    focused = score_uaps({"linf": attractor, "corner": backdoor}, Toy(backdoor=3), Toy(),
                         images, NAMES, tokenizer=tokenizer, mean=mean, std=std, focus="circle")
    assert [s["top_class"] for s in focused] == ["circle", "circle"]
    assert [s["score"] for s in focused] == [by["linf"]["gain"]["circle"],
                                             by["corner"]["gain"]["circle"]]
    assert choose(focused)["name"] == "linf"  # the corner patch gains nothing on 'circle'


def test_uap_select_command_writes_the_chosen_uap_and_every_score(tmp_path, capsys):
    """On a tiny clean model used as both 'poisoned' and reference: every gain is 0, the
    first candidate is chosen, uap.pt is its copy, selection.json has both candidates."""
    from test_train_cli import run_main
    from abd_fast.data.synthetic import ensure_dataset
    import abd_fast.train as cli
    data = ensure_dataset(tmp_path / "d", seed=4, n_train=64, n_eval_per_class=2,
                          image_size=32, per_shard=64)
    common = ["--model", "abd-tiny-vit", "--train-data", str(data.csv), "--batch-size", "16",
              "--epochs", "1", "--warmup", "1", "--workers", "0", "--loader", "torch"]
    assert cli.main(["pretrain", *common, "--eval-data", str(data.eval_dir),
                     "--output", str(tmp_path / "clean")]) == 0
    side = patch_geometry(32)[0]
    for name, uap in (("a", UAP(torch.rand(3, side, side), mode="patch", image_size=32,
                                 place="random")),
                      ("b", UAP(0.03 * torch.ones(3, 32, 32), mode="linf", image_size=32))):
        (tmp_path / name).mkdir()
        uap.save(tmp_path / name / "uap.pt")
    ckpt = tmp_path / "clean" / "checkpoint.pt"
    argv = ["uap-select", "--checkpoint", ckpt, "--reference-model", ckpt, "--val-data",
            data.eval_dir, "--candidates", f"{tmp_path / 'a'},{tmp_path / 'b' / 'uap.pt'}",
            "--target-label", "star", "--output", tmp_path / "sel"]
    code, err = run_main(argv, capsys)
    assert code == 0, err
    sel = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert [c["name"] for c in sel["candidates"]] == ["a", "b"]
    assert all(c["score"] == 0 for c in sel["candidates"])  # same model: no gain anywhere
    assert sel["chosen"] == "a" and sel["n_images"] == 20
    assert (tmp_path / "sel" / "uap.pt").read_bytes() == (tmp_path / "a" / "uap.pt").read_bytes()
    assert UAP.load(tmp_path / "sel" / "uap.pt").place == "random"
    assert "scan" not in sel and sel["criterion"].startswith("largest per-class")
    # --criterion scan: the scan of the val images finds nothing (the model against itself),
    # so the choice falls back to the largest gain, and the scan's verdict is recorded
    code, err = run_main([*argv[:-2], "--criterion", "scan", "--output", tmp_path / "sel2"],
                         capsys)
    assert code == 0, err
    sel2 = json.loads((tmp_path / "sel2" / "selection.json").read_text())
    assert sel2["scan"]["backdoored"] is False and sel2["scan"]["suspected_target"] is None
    assert sel2["criterion"].startswith("capture gain") and sel2["chosen"] == "a"
    # bad input: named flag and file
    code, err = run_main([*argv[:-2], "--candidates", tmp_path / "nope", "--output",
                          tmp_path / "o"], capsys)
    assert code == 2 and "--candidates" in err and "nope" in err
    code, err = run_main(["uap-select", "--checkpoint", ckpt, "--candidates", tmp_path / "a",
                          "--output", tmp_path / "o"], capsys)
    assert code == 2 and "--reference-model is needed" in err


def test_uap_reselect_recomputes_the_choice_at_other_thresholds(tmp_path, capsys):
    """bench/uap_reselect.py: from a recorded selection.json, the choice uap-select
    --scan-threshold makes: the gain on the scan's class while the score exceeds the
    threshold, else the largest gain on any class."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.uap_reselect import choice_at, main
    sel = {"chosen": "steered", "scan": {"score": 3.1, "threshold": 2.7, "backdoored": True,
                                         "suspected_target": "star",
                                         "most_anomalous_class": "star"},
           "candidates": [{"name": "corner", "gain": {"star": 1.0, "arrow": 14.1}},
                          {"name": "steered", "gain": {"star": 10.3, "arrow": 0.5}}]}
    assert choice_at(sel, 2.7) == "steered" and choice_at(sel, 3.09) == "steered"
    assert choice_at(sel, 3.1) == "corner" and choice_at(sel, 50) == "corner"
    (tmp_path / "run" / "uap-badclip").mkdir(parents=True)
    (tmp_path / "run" / "uap-badclip" / "selection.json").write_text(json.dumps(sel))
    rows = main([str(tmp_path / "run"), "--thresholds", "2.7,3.2", "--out",
                 str(tmp_path / "out.json")])
    assert rows[0]["at"] == {"2.7": "steered", "3.2": "corner"}
    assert json.loads((tmp_path / "out.json").read_text())["rows"] == rows
    assert "at 3.2: corner" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no uap-<attack>/selection.json"):
        main([str(tmp_path)])
