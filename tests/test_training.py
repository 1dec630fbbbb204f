"""Fit bookkeeping: the figures reported are those of the weights the model ends with."""
import keras
import pytest

from pipeline import training


class FakeRun:
    """Collects what EpochLogger would send to MLflow."""

    def __init__(self):
        self.logged = []

    def log_now(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))


def rows(*val_losses):
    return [
        {"epoch": i + 1, "val_loss": loss, "val_accuracy": 1 - loss, "seconds": 1.0}
        for i, loss in enumerate(val_losses)
    ]


def test_summary_reports_the_kept_epoch_not_the_best_accuracy():
    result = training.FitResult(rows(0.5, 0.3, 0.4), seconds=6.0, images_seen=300, kept_epoch=2)
    summary = result.summary
    assert summary["kept_epoch"] == 2 and summary["kept_val_loss"] == 0.3 and summary["kept_val_accuracy"] == 0.7
    assert summary["epochs_run"] == 3 and summary["seconds_per_epoch"] == 2.0
    assert summary["train_images_per_second"] == 50.0


@pytest.mark.parametrize("patience, expected", [(0, 4), (5, 2)])
def test_kept_epoch_follows_early_stopping_restore(params, patience, expected):
    """With restore, the lowest-val_loss epoch; without early stopping, the last one."""
    settings = params.train.model_copy(update={"early_stopping_patience": patience, "reduce_lr_patience": 0})
    settings_callbacks = training.plateau_callbacks(settings)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    for callback in settings_callbacks:
        callback.set_model(model)
        callback.on_train_begin()
        for epoch, loss in enumerate([0.9, 0.2, 0.5, 0.6]):
            callback.on_epoch_end(epoch, {"val_loss": loss})
    assert training.kept_epoch(settings_callbacks, epochs_run=4) == expected


def test_epoch_logger_keeps_rows_and_logs_prefixed_metrics():
    run = FakeRun()
    logger = training.EpochLogger(run, train_images=100)
    logger.on_epoch_begin(0)
    logger.on_epoch_end(0, {"loss": 1.5, "val_accuracy": 0.25})
    row = logger.rows[0]
    assert row["epoch"] == 1 and row["loss"] == 1.5 and row["images_per_second"] > 0
    step, logged = run.logged[0]
    assert step == 1 and logged["epoch_val_accuracy"] == 0.25 and "epoch_epoch" not in logged
