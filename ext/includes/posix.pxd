# POSIX declarations of both extensions (ext/_core.pyx; ext/_lsm.pyx and its .pxi files), once.
# The signatures are what the C library declares; nogil: none of them touches Python objects.

from posix.types cimport off_t

cdef extern from "sys/mman.h" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int PROT_READ, PROT_WRITE, MAP_SHARED
    void *MAP_FAILED

cdef extern from "unistd.h" nogil:
    ssize_t pread(int fd, void *buf, size_t n, long off)
    ssize_t c_write "write"(int fd, const void *buf, size_t n)  # "write": not Python's name
    int ftruncate(int fd, long length)
    int getpid()

cdef extern from "errno.h":
    int errno  # a macro for a thread-local lvalue: read it right after the failing call
    int EINTR
    int EDEADLK

cdef extern from "fcntl.h" nogil:
    int posix_fallocate(int fd, off_t offset, off_t length)

cdef extern from "signal.h" nogil:
    int kill(int pid, int sig)
    int SIGKILL
