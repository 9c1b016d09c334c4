// Makes the kernel library a valid (empty) Python extension module, so
// setuptools builds and installs it as ternvlm._kernels. Python code loads the
// same file with ctypes (ternvlm/runtime/kernels.py) and calls the tvk_ C ABI.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "ternvlm compute kernels; use ternvlm.runtime.kernels to call them.", -1,
    nullptr, nullptr, nullptr, nullptr, nullptr,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&kModule); }
