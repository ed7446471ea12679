"""The step-time harness (benchmarks/) measures what it says, and GPart stays exact in half precision.

Harness: the floor trains exactly the weights every method adapts; results carry the required fields;
the markdown shows the right ratios; methods are interleaved; a real subprocess worker reports its own
memory. Half precision: with bf16 weights, and with fp32 weights under CPU autocast(bfloat16), the
update's contribution layer(x) - base(x) and dL/dtheta match the fp32 reference within bf16 tolerance
relative to ||x Delta_W^T||, in a setting where merging W0 + Delta_W in bf16 would lose the update.
"""
from __future__ import annotations

import json
import statistics
import tempfile

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

import gpart
from conftest import load_script

step_time = load_script("benchmarks/step_time.py")
harness, report = step_time.harness, step_time.report


# ------------------------------------------------------------------------------------------ harness
@pytest.mark.parametrize("shape,targets", [("tiny-bert", "qv"), ("tiny-bert", "all"), ("tiny-llama", "all")])
def test_floor_trains_exactly_the_weights_gpart_adapts(shape, targets):
    names = harness.target_names(shape, targets)
    fam = harness.SHAPES[shape].family

    floor = harness.build_model(shape)
    harness.configure_floor(floor, names)
    trainable = sorted(n for n, p in floor.named_parameters() if p.requires_grad)

    adapted = get_peft_model(harness.build_model(shape), harness.peft_config("gpart", fam, names, 64, 0))
    layout = sorted(name for name, _ in adapted.peft_config["default"].layout)
    assert trainable == layout, "the floor must put weight gradients on exactly the tensors GPart adapts"
    assert all(n.endswith(".weight") for n in trainable)

    lora = get_peft_model(harness.build_model(shape), harness.peft_config("lora-r8", fam, names, 64, 0))
    wrapped = sorted(k + ".weight" for k, m in lora.base_model.model.named_modules() if hasattr(m, "lora_A"))
    assert wrapped == layout, "LoRA and GPart must adapt the same modules"

    # after a backward pass only those weights hold a gradient
    batch = harness.make_batch(floor, fam, 2, 8, 0, "cpu")
    floor(**batch).loss.backward()
    with_grad = sorted(n for n, p in floor.named_parameters() if p.grad is not None)
    assert with_grad == layout
    assert all(floor.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)


def test_meta_shape_setup_counts_the_7b_layout_without_memory():
    res = harness.run_worker(harness.WorkerSpec(shape="llama-7b-meta", method="gpart", targets="all", d=524288))
    assert res["ok"], res["error"]
    # 32 layers x (4 x 4096^2 attention + 3 x 4096 x 11008 MLP)
    assert res["D"] == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert res["trainable_params"] == 524288
    assert res["setup_s"] is not None and res["setup_s"] > 0
    # 6.5e9 targeted weights: even one byte each would be 6 GiB
    assert res["rss_now_after_mib"] - res["rss_now_before_mib"] < 512


def test_interleaved_order_rotates_and_covers_every_method():
    methods = ["gpart", "lora-r8", "floor"]
    orders = [step_time.interleaved_order(methods, r) for r in range(3)]
    assert all(sorted(o) == sorted(methods) for o in orders)
    assert [o[0] for o in orders] == methods  # each method goes first once


def _fake_runs(times: dict[str, list[list[float]]]) -> list[dict]:
    runs = []
    for method, reps in times.items():
        for rep, ts in enumerate(reps):
            runs.append(dict(harness.WorkerResult(method=method, step_times_s=ts, setup_s=0.5, peak_rss_mib=100.0,
                                                  rss_before_setup_mib=90.0, trainable_params=10,
                                                  adapter_params=8, adapter_bytes=1234).__dict__, repeat=rep))
    return runs


def test_summary_and_markdown_show_the_right_ratios():
    times = {"gpart": [[3.0, 3.0, 3.0], [3.0, 3.0, 9.0]], "lora-r8": [[1.5, 1.5, 1.5], [1.5, 1.5, 1.5]],
             "floor": [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]}
    runs = _fake_runs(times)
    summary = report.summarize(runs, list(times))
    assert set(report.SUMMARY_FIELDS) <= set(summary["gpart"])
    g = summary["gpart"]
    assert (g["median_s"], g["min_s"], g["max_s"], g["n_steps"]) == (3.0, 3.0, 9.0, 6)
    assert summary["floor"]["median_s"] == 1.5
    ratios = report.all_ratios(summary, runs)
    assert ratios["gpart/floor"]["ratio"] == pytest.approx(2.0)
    assert ratios["gpart/floor"]["per_repeat"] == pytest.approx([3.0, 1.5])
    assert ratios["gpart/lora-r8"]["ratio"] == pytest.approx(2.0)
    assert ratios["lora-r8/floor"]["ratio"] == pytest.approx(1.0)

    result = {"title": "t", "command": "python benchmarks/step_time.py --shape x", "summary": summary,
              "ratios": ratios, "environment": {}, "notes": [],
              "config": {"shape_description": "s", "targets": "qv", "target_modules": ["query", "value"], "d": 64,
                         "batch": 2, "seq": 8, "dtype": "float32", "device": "cpu", "warmup": 1, "steps": 3,
                         "repeats": 2, "D": 100}}
    md = report.render_markdown(result)
    assert "python benchmarks/step_time.py --shape x" in md
    gpart_row = next(line for line in md.splitlines() if line.startswith("| GPart"))
    assert "| 2.00x (1.50–3.00) |" in gpart_row  # vs floor, with the per-repeat range
    assert "| 2.00x (2.00–2.00) |" in gpart_row or "| 2.00x |" in gpart_row  # vs LoRA r8
    assert "GPart / floor = 2.00x" in md and "GPart / LoRA r=8 = 2.00x" in md


def test_failed_and_skipped_methods_are_reported_not_dropped():
    runs = _fake_runs({"floor": [[1.0]]})
    runs.append(dict(harness.WorkerResult(method="gpart", ok=False, error="PartitionError: d too big").__dict__,
                     repeat=0))
    runs.append(dict(harness.WorkerResult(method="head-only", ok=False, skipped="no head").__dict__, repeat=0))
    summary = report.summarize(runs, ["gpart", "head-only", "floor"])
    result = {"title": "t", "command": "c", "summary": summary, "ratios": report.all_ratios(summary, runs),
              "environment": {}, "config": {"shape_description": "s", "targets": "qv", "target_modules": ["q"],
                                            "d": 1, "batch": 1, "seq": 1, "dtype": "float32", "device": "cpu",
                                            "warmup": 0, "steps": 1, "repeats": 1}}
    md = report.render_markdown(result)
    assert "failed: PartitionError: d too big" in md
    assert "skipped: no head" in md
    assert "GPart did not run" in md


def test_in_process_run_writes_json_markdown_and_png(tmp_path):
    argv = ["--shape", "tiny-bert", "--targets", "qv", "--d", "256", "--methods", "gpart,lora-r8,head-only,floor",
            "--batch", "2", "--seq", "16", "--warmup", "1", "--steps", "2", "--repeats", "2", "--device", "cpu",
            "--in-process", "--out-dir", str(tmp_path), "--name", "smoke"]
    assert step_time.main(argv) == 0
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert result["complete"] and result["command"].endswith(" ".join(argv))
    assert [r["method"] for r in result["runs"]] == (["gpart", "lora-r8", "head-only", "floor"]
                                                     + ["lora-r8", "head-only", "floor", "gpart"])
    for key in ("config", "environment", "summary", "ratios", "load_average", "runs"):
        assert key in result
    s = result["summary"]
    for m in ("gpart", "lora-r8", "head-only", "floor"):
        assert set(report.SUMMARY_FIELDS) <= set(s[m]) and not s[m]["errors"], s[m]["errors"]
        assert s[m]["n_steps"] == 4 and s[m]["min_s"] <= s[m]["median_s"] <= s[m]["max_s"]
        assert s[m]["peak_rss_mib"] > 0 and s[m]["setup_s"] >= 0
    head = 32 * 2 + 2  # the classifier; BERT's pooler is not trained
    assert s["gpart"]["trainable_params"] == 256 + head and s["gpart"]["adapter_params"] == 256
    assert s["head-only"]["trainable_params"] == head and s["head-only"]["adapter_params"] == 0
    assert s["floor"]["trainable_params"] == s["floor"]["D"] == 2 * 2 * 32 * 32
    assert s["gpart"]["adapter_bytes"] > 256 * 4 and s["floor"]["adapter_bytes"] is None
    assert s["lora-r8"]["adapter_bytes"] > s["gpart"]["adapter_bytes"]
    r = result["ratios"]["gpart/floor"]
    assert r["ratio"] == pytest.approx(s["gpart"]["median_s"] / s["floor"]["median_s"])
    md = (tmp_path / "smoke.md").read_text()
    assert f"{r['ratio']:.2f}x" in next(line for line in md.splitlines() if line.startswith("| GPart"))
    assert (tmp_path / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the results index picks the run up, with the same ratio and a link to its report
    index = load_script("benchmarks/index.py").render(tmp_path)
    row = next(line for line in index.splitlines() if "[smoke](smoke.md)" in line)
    assert f"| {r['ratio']:.2f} |" in row and "| tiny-bert | qv | 256 | 2x16 |" in row


COMPARED = {  # benchmark -> (its tiny arguments, the methods, the reference method)
    "step_time": (["--shape", "tiny-bert", "--d", "64", "--methods", "gpart,floor", "--batch", "2", "--seq", "8",
                   "--warmup", "0", "--steps", "2"], {"gpart", "floor"}, "floor"),
    "generation": (["--shape", "tiny-llama", "--d", "64", "--prompt-len", "5", "--new-tokens", "3",
                    "--methods", "gpart,gpart-merged"], {"gpart", "gpart-merged"}, "gpart-merged"),
}


@pytest.mark.parametrize("benchmark", list(COMPARED))
def test_compare_refs_runs_both_trees_and_reports_per_round_ratios(tmp_path, benchmark, monkeypatch):
    """benchmarks/compare_refs.py against HEAD: both sides measured in the same round, the ratio is this/ref of
    the medians, the last column is GPart over the same side's reference method, the checkout is removed, and
    the index lists the rows."""
    compare = load_script("benchmarks/compare_refs.py")
    bench_args, methods, reference = COMPARED[benchmark]
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the older commit's checkout goes here
    assert compare.main(["--benchmark", benchmark, "--ref", "HEAD", "--rounds", "1", "--out-dir", str(tmp_path),
                         "--name", "cmp", "--", *bench_args]) == 0
    result = json.loads((tmp_path / "cmp.json").read_text())
    flag = "" if benchmark == "step_time" else f"--benchmark {benchmark} "
    assert result["command"] == f"python benchmarks/compare_refs.py {flag}--ref HEAD --rounds 1 -- " + " ".join(bench_args)
    assert set(result["methods"]) == methods and result["compared"] == benchmark
    for r in result["methods"].values():
        assert len(r["ref_rounds"]) == len(r["this_rounds"]) == 1 and min(r["ref_rounds"]) > 0
        assert r["per_round"] == [t / f for t, f in zip(r["this_rounds"], r["ref_rounds"])]
    g, f = result["methods"]["gpart"], result["methods"][reference]
    over_this = statistics.median(a / b for a, b in zip(g["this_rounds"], f["this_rounds"]))
    md = (tmp_path / "cmp.md").read_text()
    assert f"| {g['ratio']:.3f} |" in md and f"this: over {reference} |" in md
    assert md.rstrip().endswith(f"| {over_this:.3f} |")
    worktrees = compare.git("worktree", "list", "--porcelain")
    assert f"worktree {tmp_path}" not in worktrees and not any((tmp_path / "tmp").iterdir())  # removed
    index = load_script("benchmarks/index.py").render(tmp_path)
    assert sum("[cmp](cmp.md)" in line for line in index.splitlines()) == 2


def test_generation_benchmark_times_every_method_and_checks_the_tokens(tmp_path):
    generation = load_script("benchmarks/generation.py")
    argv = ["--shape", "tiny-llama", "--d", "64", "--prompt-len", "5", "--new-tokens", "3", "--repeats", "2",
            "--update-scale", "30", "--out-dir", str(tmp_path), "--name", "gen"]
    assert generation.main(argv) == 0
    result = json.loads((tmp_path / "gen.json").read_text())
    assert result["command"].endswith(" ".join(argv))
    methods = list(generation.METHODS)
    assert [r["method"] for r in result["runs"]] == methods + methods[1:] + methods[:1]  # rotated
    s, ratios = result["summary"], result["ratios"]
    assert set(s) == set(methods) and all(s[m]["repeats"] == 2 and s[m]["decode_ms_per_token"] > 0 for m in methods)
    # the cached, uncached and merged adapters generate the same tokens, and not the base model's
    assert result["tokens_equal"] == {"gpart": True, "gpart-uncached": True, "gpart-merged": True}
    assert all(result["tokens_differ_from_base"].values())
    # the kept memory is one fp32 merged weight per adapted layer, gone after model.train()
    assert s["gpart"]["cache_bytes"] == result["config"]["D"] * 4 == result["cache_bytes_before_train"]
    assert result["cache_bytes_after_train"] == 0
    r = ratios["gpart/lora-r8"]["decode"]
    assert r == pytest.approx(s["gpart"]["decode_ms_per_token"] / s["lora-r8"]["decode_ms_per_token"])
    md = (tmp_path / "gen.md").read_text()
    assert f"| {r:.3f} |" in next(line for line in md.splitlines() if line.startswith("| gpart |"))
    assert (tmp_path / "gen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # GPart cached over merged, repeat by repeat, in CPU time
    cpu = {(x["method"], x["repeat"]): x["decode_cpu_ms_per_token"] for x in result["runs"]}
    per = [cpu["gpart", k] / cpu["gpart-merged", k] for k in (0, 1)]
    paired = result["paired_cpu"]["gpart/gpart-merged"]
    assert paired == {"median": pytest.approx(statistics.median(per)), "slower_in": sum(v > 1 for v in per), "repeats": 2}
    assert f"gpart/gpart-merged {paired['median']:.3f} ({paired['slower_in']} of 2)" in md
    # --from-json re-renders the same report from the stored runs
    (tmp_path / "gen.md").unlink()
    assert generation.main(["--from-json", str(tmp_path / "gen.json")]) == 0
    assert (tmp_path / "gen.md").read_text() == md
    index = load_script("benchmarks/index.py").render(tmp_path)
    row = next(line for line in index.splitlines() if "[gen](gen.md)" in line)
    assert row.startswith("| tiny-llama | q_proj,k_proj,v_proj,o_proj | 64 | 3 |") and f"| {r:.2f} |" in row


@pytest.mark.parametrize("option,suffix,bytes_per_weight", [(["--dtype", "bfloat16"], "bfloat16", 2),
                                                              (["--quant", "nf4-dq"], "nf4-dq", 4)])
def test_generation_benchmark_on_a_bf16_or_4bit_base(tmp_path, option, suffix, bytes_per_weight):
    """--dtype / --quant build every method on that base: the cache keeps Delta_W (bf16: in bf16; 4-bit: in
    fp32 beside bitsandbytes' product), and the cached adapter generates the uncached adapter's tokens."""
    if option[0] == "--quant":
        pytest.importorskip("bitsandbytes")
    generation = load_script("benchmarks/generation.py")
    argv = ["--shape", "tiny-llama", "--d", "64", "--prompt-len", "5", "--new-tokens", "3", "--repeats", "1",
            "--update-scale", "30", "--methods", "base,gpart,gpart-uncached", *option, "--out-dir", str(tmp_path)]
    assert generation.main(argv) == 0
    (path,) = tmp_path.glob("*.json")
    assert path.name == f"generation-tiny-llama-qkvo-d64-{suffix}.json"
    result = json.loads(path.read_text())
    assert suffix in result["title"] and result["config"]["D"] == 2 * (64 * 64 * 2 + 64 * 32 * 2)
    assert result["tokens_equal"] == {"gpart": True, "gpart-uncached": True}
    assert result["tokens_differ_from_base"]["gpart"]
    assert result["summary"]["gpart"]["cache_bytes"] == bytes_per_weight * result["config"]["D"]
    assert f"({bytes_per_weight}.0 bytes per adapted weight;" in path.with_suffix(".md").read_text()


def test_partition_version_1_method_and_autocast_option(tmp_path):
    """`gpart-v1` times GPart on partition version 1 beside the current version; --autocast runs the forward
    under torch.autocast and says so in the report."""
    assert harness.peft_config("gpart", "encoder", ["query"], 64, 0).partition_version == 2
    assert harness.peft_config("gpart-v1", "encoder", ["query"], 64, 0).partition_version == 1
    argv = ["--shape", "tiny-bert", "--targets", "qv", "--d", "64", "--methods", "gpart,gpart-v1", "--batch", "2",
            "--seq", "8", "--warmup", "0", "--steps", "1", "--repeats", "1", "--device", "cpu", "--autocast",
            "bfloat16", "--in-process", "--out-dir", str(tmp_path)]
    assert step_time.main(argv) == 0
    (path,) = tmp_path.glob("*.json")
    assert path.name == "step_time-tiny-bert-qv-d64-b2x8-autocast-bfloat16.json"
    result = json.loads(path.read_text())
    assert result["config"]["autocast"] == "bfloat16" and "under bfloat16 autocast" in result["title"]
    assert not result["summary"]["gpart"]["errors"] and not result["summary"]["gpart-v1"]["errors"]
    assert "| GPart, partition version 1 |" in path.with_suffix(".md").read_text()


def test_subprocess_worker_reports_its_own_peak_rss():
    spec = harness.WorkerSpec(shape="tiny-llama", method="floor", targets="qv", d=64, batch=1, seq=8, warmup=0,
                              steps=1, measure_bytes=False)
    res = step_time.run_child(spec, timeout=300)
    assert res["ok"], res["error"]
    assert len(res["step_times_s"]) == 1 and res["step_times_s"][0] > 0
    # a fresh interpreter with torch and transformers imported holds well over 50 MiB, and under 4 GiB
    assert 50 < res["rss_before_setup_mib"] <= res["peak_rss_mib"] < 4096


# ----------------------------------------------------------------------------------- half precision
class QV(nn.Module):
    def __init__(self, n_in=64, n_out=48):
        super().__init__()
        self.query = nn.Linear(n_in, n_out, bias=False)
        self.value = nn.Linear(n_in, n_out, bias=False)

    def forward(self, x):
        return self.query(x) + self.value(x)


D_THETA = 24  # D = 2 * 48 * 64 = 6144 weights, 256 per group


def _setup(dtype):
    """A GPart model whose base weights make W0 x exactly 0 in any precision (W0 = [M, M], x = [v, -v],
    small integers), with |Delta_W| below half a bf16 ulp of every W0 entry: a merged bf16 weight
    W0 + Delta_W would equal W0 and lose the update entirely, while the update's own contribution
    x Delta_W^T is not swamped by rounding of W0 x."""
    gen = torch.Generator().manual_seed(0)
    base = QV()
    with torch.no_grad():
        for lin in (base.query, base.value):
            m = torch.randint(1, 5, (48, 32), generator=gen) * (torch.randint(0, 2, (48, 32), generator=gen) * 2 - 1)
            lin.weight.copy_(torch.cat([m, m], 1).float())
    model = get_peft_model(base.to(dtype), gpart.GPartConfig(d=D_THETA, target_modules=["query", "value"], seed=3))
    theta = model.base_model.gpart_theta["default"]
    assert theta.dtype == torch.float32
    with torch.no_grad():
        theta.copy_(torch.randn(D_THETA, generator=gen) * 8e-3)  # Delta_W entries ~ 5e-4, max < 2e-3
    v = torch.randint(-8, 9, (16, 32), generator=gen) / 8
    x = torch.cat([v, -v], 1)
    g = torch.randn(16, 48, generator=gen).to(torch.bfloat16).float()  # a bf16-exact cotangent
    return model, x, g


def _update_and_grad(model, x, g, autocast: bool):
    """(layer(x) - base(x) summed over the two wrappers, dL/dtheta for L = <layer outputs, g>)."""
    inner = model.base_model.model
    theta = model.base_model.gpart_theta["default"]
    theta.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ys = [inner.query(x), inner.value(x)]
        bases = [inner.query.base_layer(x), inner.value.base_layer(x)]
    update = sum(y.float() - b.float() for y, b in zip(ys, bases))
    sum((y.float() * g).sum() for y in ys).backward()
    return update.detach(), theta.grad.detach().clone(), ys[0].dtype


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode", ["bf16-weights", "fp32-weights-autocast-bf16"])
def test_bf16_update_and_theta_grad_match_fp32_reference(mode):
    ref_model, x, g = _setup(torch.float32)
    ref_update, ref_grad, _ = _update_and_grad(ref_model, x, g, autocast=False)

    # the fp32 reference is itself x Delta_W^T (float64 check), and Delta_W is below half a bf16 ulp of W0
    inner = ref_model.base_model.model
    dws = [inner.query.get_delta_weight("default"), inner.value.get_delta_weight("default")]
    exact = sum(x.double() @ dw.double().T for dw in dws)
    assert _rel(ref_update.double(), exact) < 1e-3
    assert all(dw.abs().max() < 2.0**-8 for dw in dws)  # half-ulp of bf16 at |W0| >= 1
    assert ref_update.norm() > 0 and ref_grad.norm() > 0

    if mode == "bf16-weights":
        model, _, _ = _setup(torch.bfloat16)
        update, grad, out_dtype = _update_and_grad(model, x.to(torch.bfloat16), g, autocast=False)
    else:
        model, _, _ = _setup(torch.float32)
        update, grad, out_dtype = _update_and_grad(model, x, g, autocast=True)
    assert out_dtype == torch.bfloat16  # really computed in half precision
    assert grad.dtype == torch.float32

    tol = 5 * 2.0**-8  # a few bf16 roundings, relative to ||x Delta_W^T||
    assert _rel(update, ref_update) < tol
    assert _rel(grad, ref_grad) < tol

    # the test has teeth: a merged bf16 weight (W0 + Delta_W rounded) loses the update completely
    w0 = inner.query.base_layer.weight.detach()
    merged = (w0 + dws[0]).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    naive = F.linear(xb, merged).float() - F.linear(xb, w0.to(torch.bfloat16)).float()
    assert _rel(naive, (x.double() @ dws[0].double().T).float()) > 0.5


def test_quantized_base_option_runs_adapter_methods_on_a_bitsandbytes_model(tmp_path):
    """--quant loads the shape with bitsandbytes in every worker (from a float checkpoint the driver saves);
    methods that need float weights are reported as skipped, and the report compares peak memory."""
    pytest.importorskip("bitsandbytes")
    argv = ["--shape", "tiny-llama", "--targets", "attn", "--d", "256", "--methods", "gpart,lora-r8,floor",
            "--batch", "2", "--seq", "8", "--warmup", "0", "--steps", "1", "--repeats", "1", "--device", "cpu",
            "--quant", "nf4", "--in-process", "--out-dir", str(tmp_path)]
    assert step_time.main(argv) == 0
    (path,) = tmp_path.glob("*.json")
    assert path.name == "step_time-tiny-llama-attn-d256-b2x8-nf4.json"
    result = json.loads(path.read_text())
    s = result["summary"]
    assert result["config"]["quant"] == "nf4" and "bitsandbytes nf4 base" in result["title"]
    assert not s["gpart"]["errors"] and not s["lora-r8"]["errors"] and "float weights" in s["floor"]["skipped"]
    assert s["gpart"]["D"] == 2 * (64 * 64 * 2 + 64 * 32 * 2)  # logical sizes, not the packed 4-bit storage
    assert s["gpart"]["trainable_params"] == 256
    md = path.with_suffix(".md").read_text()
    assert "Base quantized with bitsandbytes (nf4)" in md and "GPart / LoRA r=8 = " in md.split("Peak RSS")[-1]


def test_core_size_counts_code_lines_without_docstrings_comments_or_blanks():
    core_size = load_script("benchmarks/core_size.py")
    source = '"""Module doc,\ntwo lines."""\n\n# a comment\ndef f(x):\n    """Doc."""\n    return (x +\n            1)  # why\n'
    assert core_size.line_counts(source) == (8, 3)  # def, and the two lines of the return
    files = core_size.core_files(None)
    assert "src/gpart/model.py" in files and "src/gpart/functional.py" in files
    assert not any(p.startswith(core_size.OUTSIDE_CORE) for p in files)


def test_core_size_report_totals_match_its_modules(tmp_path):
    core_size = load_script("benchmarks/core_size.py")
    assert core_size.main(["--out-dir", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "core_size.json").read_text())
    counts = {p: core_size.line_counts(src) for p, src in core_size.core_files(None).items()}
    assert {p: (m["lines"], m["code_lines"]) for p, m in result["modules"].items()} == counts
    assert (result["lines"], result["code_lines"]) == tuple(map(sum, zip(*counts.values())))
    md = (tmp_path / "out" / "core_size.md").read_text()
    assert f"**{result['lines']}** | **{result['code_lines']}**" in md
    assert "Command: `python benchmarks/core_size.py --out-dir " in md
