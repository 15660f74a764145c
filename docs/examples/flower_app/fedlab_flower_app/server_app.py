"""The ServerApp: a fedlab strategy, configured by the app's run config, over Flower's Grid."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedlab.callbacks import Evaluator
from fedlab.flower import FlowerStrategy, params_from_record, run_config
from fedlab.run import build_workload

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the fedlab strategy of ``[tool.flwr.app.config]`` for ``num-server-rounds``."""
    config = run_config(context.run_config)  # the `fedlab.` keys, checked
    workload = build_workload(config)
    evaluator = Evaluator(workload)  # accuracy on the workload's held-out test set

    def central(version: int, arrays: ArrayRecord) -> MetricRecord:
        return MetricRecord(evaluator.evaluate(params_from_record(arrays)))

    strategy = FlowerStrategy.from_config(
        config, fraction_evaluate=float(context.run_config["fraction-evaluate"])
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(workload.make_model().state_dict()),
        num_rounds=config.rounds,
        evaluate_fn=central,
    )
    final = result.evaluate_metrics_serverapp[config.rounds]
    print(f"final test accuracy after {config.rounds} versions: {final['accuracy']:.3f}")
