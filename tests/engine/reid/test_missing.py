"""TEST.MISS with DeMo's meaning: the letters name the modalities that are missing."""

from __future__ import annotations

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.evaluation import evaluate_reid
from engine.reid.missing import (
    DEMO_TABLE_SETTINGS,
    canonical,
    missing_modalities,
    present_modalities,
    table_label,
)

# DeMo's model (make_model.py, eval): 'r' zeroes RGB, 'n' NI, 't' TI, 'rn' RGB + NI, 'rt' RGB + TI, 'nt' NI + TI
DEMO_ZEROED = {"r": ("RGB",), "n": ("NI",), "t": ("TI",), "rn": ("RGB", "NI"), "rt": ("RGB", "TI"),
               "nt": ("NI", "TI")}
DEMO_COLUMNS = ["M (RGB)", "M (NIR)", "M (TIR)", "M (RGB+NIR)", "M (RGB+TIR)", "M (NIR+TIR)"]


def test_each_setting_removes_what_demo_zeroes() -> None:
    for code, zeroed in DEMO_ZEROED.items():
        assert missing_modalities(code) == zeroed
        assert set(present_modalities(code)) == {"RGB", "NI", "TI"} - set(zeroed)
    assert [table_label(c) for c in DEMO_TABLE_SETTINGS] == DEMO_COLUMNS
    for everything in ("nothing", "", "None", "NOTHING"):
        assert missing_modalities(everything) == () and present_modalities(everything) == ("RGB", "NI", "TI")


def test_spelling_is_case_and_order_insensitive() -> None:
    assert missing_modalities("NR") == ("RGB", "NI") and canonical("NR") == "rn"
    assert canonical("tr") == "rt" and canonical("") == "nothing"


@pytest.mark.parametrize("bad", ["x", "rx", "rr", "rnt", "r n", "all", "keep"])
def test_anything_else_is_refused_when_the_config_loads(bad: str) -> None:
    with pytest.raises(ConfigError, match="TEST.MISS"):
        load_config(None, ["TEST.MISS", bad])


def test_miss_mode_is_checked_when_the_config_loads() -> None:
    with pytest.raises(ConfigError, match="did you mean 'zero'"):
        load_config(None, ["TEST.MISS_MODE", "zeros"])
    assert load_config(None, ["TEST.MISS", "nt", "TEST.MISS_MODE", "zero"]).TEST.MISS == "nt"


def test_scene_protocol_drops_same_id_same_scene_items() -> None:
    # one query (id 1, camera 0, scene 5); gallery: id 1 same scene other camera (nearest), id 1 other scene,
    # id 2. Camera protocol keeps the nearest item (rank-1 hit); MSVR310's scene protocol drops it.
    dist = torch.tensor([[0.1, 0.5, 0.3]])
    q_pids, g_pids = torch.tensor([1]), torch.tensor([1, 1, 2])
    by_camera = evaluate_reid(dist, q_pids, g_pids, torch.tensor([0]), torch.tensor([3, 4, 0]), max_rank=3)
    by_scene = evaluate_reid(dist, q_pids, g_pids, torch.tensor([5]), torch.tensor([5, 6, 7]), max_rank=3)
    # camera protocol: ranking g0 (hit), g2, g1 (hit) -> AP = (1/1 + 2/3) / 2
    assert float(by_camera["cmc"][0]) == 1.0 and by_camera["mAP"] == pytest.approx(5 / 6)
    # scene protocol: g0 removed; ranking g2, g1 (hit) -> AP = 1/2
    assert float(by_scene["cmc"][0]) == 0.0 and by_scene["mAP"] == pytest.approx(0.5)


class _Recorder(torch.nn.Module):
    """A stand-in model: its feature of sample i is a fixed vector; it records the inputs it saw."""

    def __init__(self, feats: torch.Tensor) -> None:
        super().__init__()
        self.feats, self.seen = feats, []

    def forward(self, images, cam_ids, mask):
        self.seen.append(({m: x.clone() for m, x in images.items()}, mask.clone()))
        idx = images["RGB"][:, 0, 0, 0].long()  # sample index written into pixel (0, 0) of RGB
        f = self.feats[idx]
        return {"feat": f, "feats": {"RGB": f, "NI": f, "TI": f, "moe": f}}


def _loader(camids: list[int], scenes: list[int], pids: list[int]) -> list[dict]:
    n = len(pids)
    images = {m: torch.ones(n, 3, 2, 2) for m in ("RGB", "NI", "TI")}
    images["RGB"][:, 0, 0, 0] = torch.arange(n, dtype=torch.float)
    return [{"images": images, "pids": torch.tensor(pids), "camids": torch.tensor(camids),
             "trackids": torch.tensor(scenes), "masks": torch.ones(n, 3, dtype=torch.bool)}]


def test_evaluate_removes_the_missing_modalities_and_follows_the_protocol() -> None:
    from engine.device import build_amp_policy
    from engine.reid import evaluate

    # query 0 (id 1), gallery 1..3 as in the protocol test above: distances 0.1, 0.5, 0.3 from the query
    feats = torch.tensor([[0.0], [0.1], [0.5], [0.3]])
    loader = _loader(camids=[0, 3, 4, 0], scenes=[5, 5, 6, 7], pids=[1, 1, 1, 2])
    amp = build_amp_policy("fp32", torch.device("cpu"))
    cfg = load_config(None, ["TEST.MISS", "rn", "TEST.FEAT_NORM", "False"])
    model = _Recorder(feats)
    results, _ = evaluate(model, loader, 1, cfg, torch.device("cpu"), amp, protocol="scene")
    assert set(results) == {"feat", "TI", "moe"}  # no score for an absent modality's own feature
    assert results["feat"]["mAP"] == pytest.approx(0.5)
    _, mask = model.seen[-1]
    assert mask[:, 0].eq(False).all() and mask[:, 1].eq(False).all() and mask[:, 2].all()  # mask mode
    camera, _ = evaluate(model, loader, 1, cfg, torch.device("cpu"), amp, protocol="camera")
    assert camera["feat"]["mAP"] == pytest.approx(5 / 6)
    zero_cfg = load_config(None, ["TEST.MISS", "t", "TEST.MISS_MODE", "zero", "TEST.FEAT_NORM", "False"])
    evaluate(model, loader, 1, zero_cfg, torch.device("cpu"), amp, miss="nt")  # miss overrides the config
    images, mask = model.seen[-1]
    assert images["NI"].eq(0).all() and images["TI"].eq(0).all() and images["RGB"].ne(0).any() and mask.all()
