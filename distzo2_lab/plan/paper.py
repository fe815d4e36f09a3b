"""Published figures the planner is checked against, and the stated scenarios that reproduce them.

- ZO2 (arXiv 2503.12668): peak GPU memory with offloading, batch 1, seq 2048, fp16, OPT 1.3B-175B.
- DistZO2 (arXiv 2507.03211): Nsight share of GPU activity spent computing on OPT-1.3B
  (2 GPUs with NVLink: PertP ~39 %, DDP ~55 %; 4 GPUs PertP+DDP: ~19 % without slicing, ~45 % with)
  and the headline, about 3x the throughput of ZO2 on OPT-175B.
The papers do not give their nodes' link speeds, so the scenario below is a stated assumption:
one node of A100-80GB SXM GPUs, each on its own PCIe Gen4 x16 link (24 GB/s per direction), a host
memory path of 36 GB/s per direction shared by all of them, NVLink between them; OPT-1.3B at 4
sequences x 2048 tokens per dp group for the traces, OPT-175B at 1 x 2048 for the headline; ZO2's
implementation (fp16 store and transfers).
"""
from __future__ import annotations

from distzo2_lab.config import PrecisionConfig
from distzo2_lab.parallel.layout import Layout
from distzo2_lab.plan.hardware import PROFILES, Hardware, with_overrides
from distzo2_lab.plan.memory import GB, ZO2_REFERENCE, Workload, memory_plan
from distzo2_lab.plan.simulator import simulate

ZO2_PEAK_GB = {"opt-1.3b": 3.75, "opt-2.7b": 4.14, "opt-6.7b": 4.99, "opt-13b": 6.18, "opt-30b": 8.86,
               "opt-66b": 12.07, "opt-175b": 18.04}
FP16 = PrecisionConfig("fp16", "fp16", "fp32")

# (case, layout, published compute share)
TRACE_CASES = [
    ("2 GPUs NVLink, PertP", Layout(dp=1, pert=2), 0.39),
    ("2 GPUs NVLink, DDP", Layout(dp=2, pert=1), 0.55),
    ("4 GPUs PertP+DDP, no slicing", Layout(dp=2, pert=2), 0.19),
    ("4 GPUs PertP+DDP, slicing", Layout(dp=2, pert=2, slice=True), 0.45),
]
HEADLINE_SPEEDUP = 3.0
HEADLINE_LAYOUT = Layout(dp=2, pert=2, slice=True)


def trace_node() -> Hardware:
    """The stated node: A100-80GB SXM, one PCIe Gen4 x16 per GPU, a 36 GB/s shared host path, NVLink."""
    return with_overrides(PROFILES["a100-80g-sxm"], name="a100-80g-sxm (DistZO2 trace node, assumed)",
                          devices_per_switch=1, switch_gbps=None, host_gbps=36.0)


def zo2_workload(model: str, batch: int = 1, seq: int = 2048, tier: str = "host") -> Workload:
    return Workload(model=model, batch=batch, seq=seq, precision=FP16, tier=tier, prefetch=1,
                    implementation=ZO2_REFERENCE)


def zo2_memory_check(hw: Hardware | None = None) -> list[dict]:
    """Planned peak GPU memory of ZO2 against its published figure, per OPT size."""
    hw = hw or PROFILES["a100-80g-sxm"]
    rows = []
    for model, published in ZO2_PEAK_GB.items():
        mp = memory_plan(zo2_workload(model), Layout(), hw)
        rows.append({"model": model, "published_gb": published, "planned_gb": mp.device_total / GB,
                     "error": mp.device_total / GB / published - 1.0,
                     "components_gb": {k: v / GB for k, v in mp.device.items()}})
    return rows


def trace_shares(steps: int = 3) -> list[dict]:
    """Simulated compute share of GPU activity for DistZO2's four trace cases (OPT-1.3B)."""
    hw, w = trace_node(), zo2_workload("opt-1.3b", batch=4)
    rows = []
    for case, layout, published in TRACE_CASES:
        sim = simulate(w, layout, hw, steps=steps)
        shares = sim.shares()
        rows.append({"case": case, "layout": layout, "published": published, "simulated": shares["compute"],
                     "shares": shares, "simulation": sim})
    return rows


def headline(steps: int = 2) -> dict:
    """DistZO2 (4 GPUs, dp=2 x pert=2, sliced) over ZO2 (one GPU) on OPT-175B, tokens/s."""
    hw, w = trace_node(), zo2_workload("opt-175b")
    zo2 = simulate(w, Layout(), hw, steps=steps)
    dist = simulate(w, HEADLINE_LAYOUT, hw, steps=steps)
    return {"published": HEADLINE_SPEEDUP, "speedup": dist.tokens_per_s / zo2.tokens_per_s,
            "zo2_step_s": zo2.step_s, "distzo2_step_s": dist.step_s, "zo2": zo2, "distzo2": dist,
            "layout": HEADLINE_LAYOUT, "hardware": hw.name}


def format_paper_checks(memory: list[dict], shares: list[dict], head: dict) -> str:
    lines = ["ZO2 peak GPU memory (batch 1, seq 2048, fp16), planned vs published:"]
    lines += [f"  {r['model']:>9}: {r['planned_gb']:6.2f} GB vs {r['published_gb']:6.2f} GB ({r['error']:+.1%})"
              for r in memory]
    lines.append("DistZO2 compute share of GPU activity on OPT-1.3B (node: " + trace_node().name + "):")
    lines += [f"  {r['case']:<30} simulated {r['simulated']:.0%} vs published ~{r['published']:.0%}" for r in shares]
    lines.append(f"DistZO2 headline on OPT-175B: 4 GPUs dp=2 x pert=2 sliced vs 1-GPU ZO2: {head['speedup']:.2f}x "
                 f"(published ~{head['published']:.0f}x); step {head['distzo2_step_s']:.1f} s vs "
                 f"{head['zo2_step_s']:.1f} s with 2x the tokens")
    return "\n".join(lines)
