"""What is specific to computing on a CPU: the host tuning a program asks for (`tuning.tune()`) and the CPU
forms of the model layers (`kernels`). Nothing here runs on import; this package imports no jax itself."""
