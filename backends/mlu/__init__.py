"""Cambricon MLU backend (torch_mlu_ops): being written."""
