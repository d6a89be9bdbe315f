"""Data: sources → uint8 tensors, stratified seeded splits, batched augmentation, device loaders.

`data` imports nothing from `train`.
"""

from .dataset import Dataset  # noqa: F401
from .sources import DataError, load_data, load_source, list_datasets, SOURCES  # noqa: F401
from .split import stratified_split, Split  # noqa: F401
from .augment import augment_batch  # noqa: F401
from .loader import DeviceLoader, prepare  # noqa: F401
