"""The backend that reaches libmoe_sft: the nanobind extension module.

A backend exposes the C ABI one-to-one with arrays passed by address (see ``_ext.cpp``); ``_layer`` is the
only user and checks every array before its address crosses.
"""
from . import _moe_sft_ext as backend  # noqa: F401

NAME = "nanobind"
