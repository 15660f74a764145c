"""Where client data comes from: workloads, partitioners and user-supplied data.

A workload pairs a model factory with a federation of clients (:class:`Workload`). Client
data is never materialised up front: ``client_data(k, split)`` rebuilds (or memory-maps)
client ``k``'s examples on every call, so registering a million clients costs a few integers,
and the same ``(seed, k)`` gives bit-identical tensors whatever was built before and in any
order. One module per source: :mod:`~fedlab.data.synthetic`, :mod:`~fedlab.data.digits`,
:mod:`~fedlab.data.custom`, :mod:`~fedlab.data.wls`, :mod:`~fedlab.data.leaf` (FEMNIST and
Shakespeare), :mod:`~fedlab.data.vision` (CIFAR-10/100) and :mod:`~fedlab.data.huggingface`
(any local Hugging Face dataset, partitioned by Flower Datasets); the partitioners of central
data sets are in :mod:`~fedlab.data.partition`, the protocol and shared helpers in
:mod:`~fedlab.data.base`, and :func:`make_workload` in :mod:`~fedlab.data.factory`.
"""

from __future__ import annotations

from fedlab.data.base import SPLITS, ClientData, MissingExtra, PublicSample, Workload
from fedlab.data.custom import CustomWorkload as _CustomWorkload  # noqa: F401
from fedlab.data.digits import PRETRAIN_CONFIG, SHIFT_PUBLIC_EXAMPLES, pretrain
from fedlab.data.digits import DigitsWorkload as _DigitsWorkload  # noqa: F401
from fedlab.data.factory import DATASETS, DEFAULT_PARTITION, WORKLOADS, make_workload
from fedlab.data.partition import PARTITIONS
from fedlab.data.synthetic import SyntheticWorkload as _SyntheticWorkload  # noqa: F401
from fedlab.data.wls import WLS_DIM, WLS_EXAMPLES, WLS_NOISE_STD, unpack_wls
from fedlab.data.wls import WLSWorkload as _WLSWorkload  # noqa: F401
from fedlab.registry import load_dotted

# CustomWorkload, DigitsWorkload...: also importable under their private names of the
# single-module days (``_DigitsWorkload``), which tests use.
__all__ = [
    "DATASETS",
    "DEFAULT_PARTITION",
    "PARTITIONS",
    "PRETRAIN_CONFIG",
    "SHIFT_PUBLIC_EXAMPLES",
    "SPLITS",
    "WLS_DIM",
    "WLS_EXAMPLES",
    "WLS_NOISE_STD",
    "WORKLOADS",
    "ClientData",
    "MissingExtra",
    "PublicSample",
    "Workload",
    "load_dotted",
    "make_workload",
    "pretrain",
    "unpack_wls",
]
