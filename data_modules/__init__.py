"""Engram data modules; pick one in a config with ``data: class_path: data_modules.<Name>``."""

from data_modules.base import EngramDataModule, TokenWindows
from data_modules.embedded import EmbeddedDataModule
from data_modules.listops import ListOpsDataModule
from data_modules.needle import NeedleDataModule, TokenNeedleDataModule
from data_modules.pg19 import PG19DataModule
from data_modules.slim_pile import SlimPileDataModule

__all__ = [
    "EmbeddedDataModule",
    "EngramDataModule",
    "ListOpsDataModule",
    "NeedleDataModule",
    "PG19DataModule",
    "SlimPileDataModule",
    "TokenNeedleDataModule",
    "TokenWindows",
]
