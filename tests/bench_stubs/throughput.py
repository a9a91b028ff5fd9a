"""A stand-in benchmark for the runner's tests: real result files and a real PNG, fixed figures."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from decodekit.bench.common import md_table, parser, write_results  # noqa: E402
from tqdm import tqdm  # noqa: E402

args = parser("stub").parse_args()
for _ in tqdm(range(3), desc="workload"):
    pass
fig, ax = plt.subplots()
ax.plot([1, 8], [20, 100])
fig.savefig(f"{args.out}/throughput_plot.png")
summary = {"bench": "throughput", "tokens_per_s": {"decodekit_bs1": 30.0}, "ratio_vs_hf_bs1": 1.1,
           "ratio_vs_hf_bs8": 0.9, "prefill_tokens_saved_frac": 0.85, "quick": args.quick}
write_results("throughput", summary, md_table(["batch", "tok/s"], [[1, 30.0]]), args.out)
