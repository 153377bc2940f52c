"""DeepSeek V3 / V4 models written against the HAL: being written."""
