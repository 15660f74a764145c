"""What each workload is, for ``fedlab datasets`` and the docs: models, size, partitions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """One workload as ``fedlab datasets`` lists it.

    Attributes:
        name: the ``--workload`` value.
        source: where the data comes from.
        models: built-in ``--model`` names, the default first.
        size: clients and examples (of the full data set, for file-backed workloads).
        partitions: ``--partition`` values, the default first.
        needs: the flags or extra it needs beyond ``--workload``.
    """

    name: str
    source: str
    models: tuple[str, ...]
    size: str
    partitions: tuple[str, ...]
    needs: str = ""


CENTRAL = ("iid", "dirichlet", "shards", "lognormal")

CATALOGUE: tuple[Entry, ...] = (
    Entry("synthetic", "LEAF Synthetic(alpha, beta), generated", ("logreg", "mlp"),
          "any --clients; 60 features, 10 classes, ~50-1000 examples per client",
          ("iid", "natural")),
    Entry("digits", "scikit-learn 8x8 digits (bundled)", ("cnn", "mlp"),
          "any --clients; 1,437 train / 360 test, 10 classes", CENTRAL),
    Entry("digits-shift", "digits turned 90 degrees, model pretrained upright", ("mlp", "cnn"),
          "any --clients; 10 classes, a 64-example public sample", CENTRAL),
    Entry("wls", "weighted least squares (ADMM-WLS), generated", ("linear",),
          "any --clients; 20 examples of 8 features each", ("natural",)),
    Entry("femnist", "LEAF FEMNIST preprocessed JSON", ("cnn",),
          "3,597 writers (LEAF full), ~805,000 28x28 images, 62 classes", ("natural",),
          "--data-dir"),
    Entry("shakespeare", "LEAF Shakespeare preprocessed JSON", ("lstm",),
          "1,129 roles (LEAF full), ~4.2 M 80-character samples, 80 characters",
          ("natural",), "--data-dir"),
    Entry("cifar10", "CIFAR-10 binary version", ("cnn",),
          "any --clients; 50,000 train / 10,000 test 32x32 images, 10 classes",
          ("dirichlet", "iid", "shards", "lognormal"), "--data-dir"),
    Entry("cifar100", "CIFAR-100 binary version", ("cnn",),
          "any --clients; 50,000 train / 10,000 test 32x32 images, 100 classes",
          ("dirichlet", "iid", "shards", "lognormal"), "--data-dir"),
    Entry("hf", "a local Hugging Face dataset, split by Flower Datasets",
          ("cnn (images)", "logreg", "mlp"), "the dataset's; --clients partitions",
          ("iid", "dirichlet", "pathological", "shards", "natural"),
          "--dataset --features --label; pip install 'fedlab[hf-data]'"),
    Entry("custom", "your load_client(client_id, num_clients, seed)", ("logreg", "mlp"),
          "any --clients", ("natural",), "--data pkg.mod:load_client"),
)  # fmt: skip
