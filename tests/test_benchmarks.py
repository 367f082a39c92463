"""The benchmarks never rot: each runs on tiny shapes (the `smoke` suite), and the peer adapter reads
megabyte-pytorch's logits the way its own loss does."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import common, peer, suites
from benchmarks import run as bench_run
from bytelm.models import Megabyte, byte_loss

needs_peer = pytest.mark.skipif(not peer.available(), reason="megabyte-pytorch not installed (pip install '.[bench]')")


# the benchmarks CI runs on every change; long_training and swarm (about 100 s of the 110 s all seven take) run with
# the whole suite under -m slow
QUICK = ["generation", "training", "long_context", "quality", "serving"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = bench_run.main(["--suite", "smoke", "--out", str(out), "--threads", "1", "--only", *QUICK])
    return out, results


@pytest.fixture(scope="module")
def smoke_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-all")
    results = bench_run.main(["--suite", "smoke", "--out", str(out), "--threads", "1"])
    return out, results


def test_the_quick_benchmarks_write_json_and_markdown(smoke):
    out, results = smoke
    assert set(results) == set(QUICK)
    for name in QUICK:
        payload = json.loads((out / f"{name}.json").read_text())
        assert payload["machine"]["torch"] == torch.__version__
        assert (out / f"{name}.md").read_text().startswith("# ")


@pytest.mark.slow
def test_every_benchmark_writes_json_markdown_and_summary(smoke_all):
    out, results = smoke_all
    assert set(results) == set(bench_run.BENCHMARKS)
    for name in bench_run.BENCHMARKS:
        payload = json.loads((out / f"{name}.json").read_text())
        assert payload["machine"]["torch"] == torch.__version__
        assert (out / f"{name}.md").read_text().startswith("# ")
    summary = (out / "summary.md").read_text()
    assert summary.count("\n| ") >= 5  # header + at least four measurements


def test_generation_timings_are_per_byte_and_positive(smoke):
    _, results = smoke
    g = results["generation"]
    for key in ("megabyte", "transformer"):
        assert len(g["per_byte_median_s"][key]) == g["bytes"]
        assert all(t > 0 for t in g["per_byte_median_s"][key])
    assert g["megabyte_vs_transformer"] > 0


def test_long_context_records_every_length(smoke):
    _, results = smoke
    for m in results["long_context"]["models"].values():
        assert set(m["runs"]) == {str(L) for L in suites.get("smoke").long_lengths}
        assert all(r["status"] == "ok" and r["seconds"] > 0 for r in m["runs"].values())


@pytest.mark.slow
def test_long_training_records_every_length_with_its_estimate(smoke_all):
    _, results = smoke_all
    lt = results["long_training"]
    assert {m["checkpointing"] for m in lt["models"].values()} == {True, False}
    for m in lt["models"].values():
        assert set(m["runs"]) == {str(L) for L in suites.get("smoke").long_train_lengths}
        assert all(r["status"] == "ok" and r["seconds"] > 0 and r["estimate_mb"] > 0 for r in m["runs"].values())


def test_quality_trains_every_model(smoke):
    _, results = smoke
    for r in results["quality"]["results"].values():
        assert r["steps"] > 0 and 0 < r["val_bpb"] < 10


def test_serving_measures_random_traffic_a_burst_and_the_closed_loop(smoke):
    _, results = smoke
    sv, suite = results["serving"], suites.get("smoke")
    assert sv["compiled_available"] == ("compiled" in sv["modes"])
    for m in sv["models"].values():
        assert set(m["by_mode"]) == set(sv["modes"]) and m["runs"] == m["by_mode"]["eager"]["runs"]
        for b in m["by_mode"].values():
            t = b["traffic"]
            assert [r["clients"] for r in t["runs"]] == suite.serve_concurrency
            for r in [t["back_to_back"], *t["runs"]]:
                assert r["bytes_per_s"] > 0 and 0 < r["ttfb_p50_ms"] <= r["ttfb_p99_ms"]
                assert 0 < r["global_step_fraction"] <= 1
                assert r["bytes"] >= r["requests"] * suite.traffic_output_bytes[0]
            assert 0 < b["burst"]["ttfb_p50_ms"] <= b["burst"]["ttfb_max_ms"]
            assert [r["streams"] for r in b["runs"]] == suite.serve_concurrency and b["batch1_us_per_byte"] > 0


def test_fit_exponent_recovers_a_power_law():
    xs = [1e3, 1e4, 1e5]
    assert common.fit_exponent(xs, [3 * x**2 for x in xs]) == pytest.approx(2.0)
    assert common.fit_exponent([1.0], [1.0]) is None


@needs_peer
def test_peer_matches_our_shape_within_five_percent():
    cfg = suites.get("full").megabyte

    with torch.device("meta"):
        ours, theirs = Megabyte(cfg), peer.build_peer(cfg, cfg.max_seq_len)
    ratio = sum(p.numel() for p in theirs.parameters()) / ours.num_params()
    assert 0.95 <= ratio <= 1.05


def _own_loss_mblm(m, x):
    from mblm import MBLMReturnType

    return m(x, return_type=MBLMReturnType.LOSS)


@pytest.mark.parametrize("build, logits, own_loss, available", [
    (peer.build_peer, peer.peer_logits, lambda m, x: m(x, return_loss=True), peer.available()),
    (peer.build_mblm, peer.mblm_logits, _own_loss_mblm, peer.mblm_available()),
], ids=["megabyte-pytorch", "mblm"])
def test_peer_logits_are_its_own_loss_and_causal(build, logits, own_loss, available):
    if not available:
        pytest.skip("peer not installed (pip install '.[bench]')")
    torch.manual_seed(0)
    cfg = suites.get("smoke").megabyte
    m = build(cfg, 64).eval()
    assert abs(sum(p.numel() for p in m.parameters()) / Megabyte(cfg).num_params() - 1) < 0.25
    x = torch.randint(1, 256, (2, 64))  # no byte 0: the packages' own losses skip it (their pad id is 0)
    with torch.no_grad():
        ours = logits(m, x)
        assert byte_loss(ours, x).item() == pytest.approx(own_loss(m, x).item(), rel=1e-5)
        k = 21
        y = x.clone()
        y[:, k] = (y[:, k] + 1) % 256
        changed = logits(m, y)
    torch.testing.assert_close(changed[:, : k + 1], ours[:, : k + 1])
    assert not torch.allclose(changed[:, k + 1 :], ours[:, k + 1 :])


@needs_peer
def test_peer_generate_is_greedy_over_its_forward():
    torch.manual_seed(0)
    m = peer.build_peer(suites.get("smoke").megabyte, 32).eval()
    seq = peer.peer_generate(m, torch.zeros(1, 0, dtype=torch.long), 6)
    with torch.no_grad():
        for t in range(1, 6):  # each byte is the argmax of the prediction after the bytes before it
            assert seq[0, t] == peer.peer_logits(m, seq[:, : t + 1])[0, t].argmax()


@needs_peer
def test_ablation_variants_build_and_train(tmp_path):
    from benchmarks import ablation

    out = ablation.main(["--variants", "ours-shift", "peer-noshift", "--steps", "1", "--windows", "1",
                          "--out", str(tmp_path)])
    assert [r["variant"] for r in out["runs"]] == ["peer-noshift", "ours-shift"]  # in the table's order
    assert all(0 < r["val_bpb"] < 9 and len(r["bpb_by_patch_position"]) == 8 for r in out["runs"])
    assert (tmp_path / "ablation.md").is_file()


def test_design_experiments_are_causal_and_tabulate():
    from benchmarks import design

    assert design.causal_check("prefix4+sepnorm", T=24) and design.causal_check("offset", T=24)
    md = design.table()  # from the committed raw rows
    assert "| ours |" in md and "| peer |" in md


def test_optimizer_step_benchmark_runs(tmp_path):
    from benchmarks import optimizer_step

    payload = optimizer_step.main(["--preset", "tiny", "--batch", "1", "--repeats", "1", "--out", str(tmp_path)])
    assert (tmp_path / "optimizer_step_tiny.md").is_file() and payload["speedup_fp32_over_bf16"] > 0
    assert all(len(v) == 1 and v[0] > 0 for v in payload["seconds"].values())


def test_media_benchmark_trains_scores_and_samples_both_models(tmp_path):
    """Generated images and tones (no Debian data needed), tiny models, a second of training each."""
    from benchmarks import media

    out = tmp_path / "out"
    payload = media.main(["--suite", "smoke", "--out", str(out), "--cache", str(tmp_path / "cache")])
    for kind in ("images", "audio"):
        res = payload["datasets"][kind]
        for m in media.MODELS:
            assert res["models"][m]["steps"] > 0 and res["models"][m]["params"] > 0
            assert 0 < res["eval"]["test"][m]["bpb"] < 12
        assert "xz" in res["eval"]["test"]["codecs_bpb"]
    assert "bits_per_pixel" in payload["datasets"]["images"]["eval"]["test"]["megabyte"]
    assert "flac (16-bit decode)" in payload["datasets"]["audio"]["eval"]["test"]["codecs_bpb"]
    assert (out / "media.md").read_text().startswith("# ")
    for f in ("media-images.png", "media-completions.png", "media-audio.png", "media-megabyte-continuation.wav"):
        assert (out / f).stat().st_size > 0


def test_patching_benchmark_trains_every_rule_and_measures_their_speed(tmp_path):
    import pydoc_data.topics  # the standard library's documentation topics: ~0.5 MB of prose every machine has

    from benchmarks import patching

    out, models = tmp_path / "out", tmp_path / "models"
    p = patching.main(["--suite", "smoke", "--corpus", pydoc_data.topics.__file__, "--seconds", "0.5",
                       "--seeds", "0", "1", "--save", str(models), "--out", str(out)])
    assert set(p["results"]) == set(patching.VARIANTS)
    for r in p["results"].values():
        assert len(r["val_bpb_per_seed"]) == 2 and 0 < r["val_bpb"] < 10
        assert 1 <= r["mean_patch"] <= 8
    # the fixed rules and the space rule cut where they must; the entropy rule's cuts need a trained entropy model,
    # which half a second of training may not give (its entropies are then equal to float noise: no cut but P's)
    assert [p["results"][n]["mean_patch"] for n in ("fixed P=8", "fixed P=4")] == [8, 4]
    assert p["results"]["space (P<=8)"]["mean_patch"] < 8
    speed = patching.main(["--suite", "smoke", "--corpus", p["corpus"], "--speed", str(models), "--out", str(out),
                            "--requests-per-client", "1"])
    for r in speed["results"].values():
        assert r["gen"]["bytes_per_s"] > 0 and r["traffic"]["bytes"] > 0
        assert 0 < r["gen"]["global_steps_per_byte"] <= 1
