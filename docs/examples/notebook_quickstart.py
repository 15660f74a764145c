# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # fedlab from a notebook
#
# One call runs a federation and returns its results: `fedlab.simulate(...)` takes the same
# settings as `fedlab simulate` (a flag `--local-steps` is the keyword `local_steps`) and
# writes the same run directory. This file is a notebook in the percent format: open it in
# VS Code or JupyterLab (with jupytext), or run it as a script with `python`.
# `tests/test_experiment.py` runs it.

# %%
import shutil
from pathlib import Path

import fedlab

RUNS = Path("runs/notebook")
shutil.rmtree(RUNS, ignore_errors=True)  # start over each time the notebook runs

# %% [markdown]
# ## Run FedAvg and get a History back
#
# `progress=True` draws the progress bar; without it the call is quiet.

# %%
fedavg = fedlab.simulate(
    clients=100, fraction=0.1, rounds=6, local_steps=5, seed=1, out=RUNS / "fedavg"
)
print(fedavg)

# %% [markdown]
# The History holds the metrics of every version as columns, the summary, the final model's
# tensors and the run directory.

# %%
print("accuracy per version:", [round(a, 4) for a in fedavg["accuracy"]])
print("final accuracy:", fedavg.summary["accuracy"])
print("model tensors:", {name: tuple(t.shape) for name, t in fedavg.params.items()})
print("run directory:", sorted(p.name for p in fedavg.run_dir.iterdir()))

# %% [markdown]
# With pandas installed, `to_dataframe()` gives one row per version.

# %%
frame = fedavg.to_dataframe()
print(frame[["time", "accuracy", "loss", "bytes_up"]].round(4))

# %% [markdown]
# ## Compare a second strategy
#
# Keywords override a base configuration key by key; option tables merge.

# %%
base = fedavg.config.replace(out="")
fedadam = fedlab.simulate(
    base,
    strategy_options={"server_optimizer": "adam", "server_lr": 0.03},
    out=RUNS / "fedadam",
)
for name, history in (("fedavg", fedavg), ("fedadam", fedadam)):
    print(f"{name:8s} final accuracy {history.summary['accuracy']:.4f}")

# %% [markdown]
# ## Plot
#
# `plot()` returns a matplotlib Figure (a notebook shows it); `path=` also saves it, as PNG,
# SVG or PDF by the suffix.

# %%
figure = fedavg.plot(["accuracy", "loss"], x=["version", "time"], path="notebook-fedavg.png")
print(len(figure.axes), "panels")

# %% [markdown]
# ## Continue a run
#
# `resume=` continues from the checkpoint; only settings that do not change the numbers (such
# as `rounds`) may differ. The returned History covers the whole run.

# %%
longer = fedlab.simulate(resume=RUNS / "fedavg", rounds=9)
print(longer.versions)

# %% [markdown]
# ## Read a finished run later
#
# `History.load` reads a run directory, whichever way it was made (`fedlab simulate` too).
# The final model is also in `model.safetensors`, which `safetensors.torch.load_file` reads.

# %%
again = fedlab.History.load(RUNS / "fedavg")
assert again.rows == longer.rows
print("safetensors model:", (RUNS / "fedavg" / "model.safetensors").stat().st_size, "bytes")
