"""Triton kernels. Each module imports triton itself, so only importing one of them needs triton;
`kernels` and its torch functions work without it."""
