"""The one quantize job: source -> recipe -> calibration -> blocks -> sink; runner, streaming, pre-flight."""
