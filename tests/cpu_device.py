"""The device and dtype tests run engines and servers on, named explicitly: CPU and fp32. Left to
ServerArgs' defaults, a GPU machine would pick CUDA and bf16 and fail the fp32 parity checks."""

CPU_ARGS = {"device": "cpu", "dtype": "float32"}        # Engine(...), ServerArgs(...), LocalServer(...)
CPU_FLAGS = ["--device", "cpu", "--dtype", "float32"]  # ServerProcess([...]), the launch_server CLI
