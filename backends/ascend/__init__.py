"""Huawei Ascend backend (torch_npu): being written."""
