"""The SUBLLM network: layers, subsampling/upsampling/bypass, schedules and the model."""
