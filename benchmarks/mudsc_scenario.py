"""MuDSC on two digits MLPs trained from different seeds: averaging vs alignment vs zip.

Two MLPs (64 → hidden → hidden → 10, ReLU) are trained on scikit-learn's bundled digits
(no download) from different initialisations and data orders, then merged without any
training. Plain averaging of independently initialised networks fails (their hidden units
are not in correspondence); MuDSC matches the units first. Every merge is evaluated on the
held-out split; the prediction-level ensemble (mean logits) is the reference a merge tries
to match. Activation statistics use the *training* inputs, unlabeled.

Run: ``python benchmarks/mudsc_scenario.py [--trials 3] [--hidden 64] [--epochs 30] [--threads 1]``.
Prints a table and writes ``benchmarks/results/mudsc_scenario.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from merging.methods import get_method

RESULTS = Path(__file__).parent / "results"

# label -> (method name, hyperparameters). Matchings run uncorrected (repair="none"), and
# MuDSC also with its default REPAIR correction.
MERGES: dict[str, tuple[str, dict]] = {
    "average": ("average", {}),
    "Re-Basin weight matching": ("mudsc", {"mode": "align", "use_activation": False, "repair": "none"}),
    "activation align (A. Align)": ("mudsc", {"mode": "align", "use_weight": False, "repair": "none"}),
    "MuDSC-Align (alpha 0.5)": ("mudsc", {"mode": "align", "alpha": 0.5, "repair": "none"}),
    "MuDSC-Align (alpha 0.5) + REPAIR": ("mudsc", {"mode": "align", "alpha": 0.5, "repair": "repair"}),
    "ZipIt": ("mudsc", {"mode": "zip", "use_weight": False, "repair": "none"}),
    "MuDSC-Zip (alpha 0.5)": ("mudsc", {"mode": "zip", "alpha": 0.5, "repair": "none"}),
    "MuDSC-Zip (alpha 0.5) + REPAIR": ("mudsc", {"mode": "zip", "alpha": 0.5, "repair": "repair"}),
}


def digits_split(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stratified 80/20 split of the 1797 digits, pixels scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.2, random_state=seed, stratify=y)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_x(x_tr), torch.tensor(y_tr), as_x(x_te), torch.tensor(y_te)


def make_mlp(hidden: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, state: dict[str, Tensor], x: Tensor, y: Tensor) -> float:
    return float((torch.func.functional_call(model, state, (x,)).argmax(1) == y).float().mean())


def run(trials: int, hidden: int, epochs: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    x_tr, y_tr, x_te, y_te = digits_split()
    unlabeled = list(x_tr.split(256))
    acc: dict[str, list[float]] = {}
    secs: dict[str, list[float]] = {}
    for trial in range(trials):
        models = [train(make_mlp(hidden, 2 * trial + j), x_tr, y_tr, epochs, seed=100 + 2 * trial + j) for j in (0, 1)]
        states = [m.state_dict() for m in models]
        skeleton = make_mlp(hidden, 0).eval()
        acc.setdefault("expert A", []).append(accuracy(skeleton, states[0], x_te, y_te))
        acc.setdefault("expert B", []).append(accuracy(skeleton, states[1], x_te, y_te))
        with torch.no_grad():
            logits = sum(torch.func.functional_call(skeleton, s, (x_te,)) for s in states)
        acc.setdefault("ensemble (mean logits)", []).append(float((logits.argmax(1) == y_te).float().mean()))
        for label, (name, hparams) in MERGES.items():
            method = get_method(name, **hparams)
            if trial == 0:  # untimed warm-up: one-time costs (lazy imports, allocator) stay out
                method.merge(states, model=skeleton, data=unlabeled)
            start = time.perf_counter()
            merged = method.merge(states, model=skeleton, data=unlabeled)
            secs.setdefault(label, []).append(time.perf_counter() - start)
            acc.setdefault(label, []).append(accuracy(skeleton, merged, x_te, y_te))
    return acc, secs


def table(acc: dict[str, list[float]], secs: dict[str, list[float]]) -> str:
    def mean_sd(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{scale * statistics.mean(values):.{digits}f} ± {scale * sd:.{digits}f}"

    lines = ["| model | test accuracy (%) | merge time (s) |", "|---|---|---|"]
    for label, values in acc.items():
        time_s = mean_sd(secs[label], digits=2) if label in secs else "-"
        lines.append(f"| {label} | {mean_sd(values, 100.0)} | {time_s} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steady timings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    acc, secs = run(args.trials, args.hidden, args.epochs)
    body = table(acc, secs)
    print(body)
    command = "python " + " ".join(["benchmarks/mudsc_scenario.py", *sys.argv[1:]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mudsc_scenario.md").write_text(
        "# MuDSC scenario: two digits MLPs from different seeds\n\n"
        f"Command: `{command}`  \n"
        f"MLP 64-{args.hidden}-{args.hidden}-10 (ReLU), Adam 1e-3, {args.epochs} epochs, batch 64; "
        f"{args.trials} trials (mean ± sd; trial t trains seeds 2t and 2t+1). Digits split 80/20 "
        "(stratified, seed 0). Activations from the unlabeled training inputs (batches of 256). "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s).\n\n" + body + "\n"
    )


if __name__ == "__main__":
    main()
