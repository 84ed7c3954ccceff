package proctree

import (
	"io/fs"

	"golang.org/x/sys/unix"
)

// readFile reads a small file of /proc whole into buf, grown as needed,
// with open(2), read(2) and close(2) alone: os.ReadFile also stats the
// file and offers it to the runtime's poller (fcntl twice, epoll_ctl,
// fstat), which triples the system calls of a read that upgrader makes
// on an upgrade's path once per thread (ChildrenOf) or per process
// (Read). The error is a *fs.PathError naming path, with the errno
// (fs.ErrNotExist for a process or thread that has gone).
func readFile(path string, buf []byte) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	for err == unix.EINTR {
		fd, err = unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	buf = buf[:0]
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := unix.Read(fd, buf[len(buf):cap(buf)])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, &fs.PathError{Op: "read", Path: path, Err: err}
		}
		if n == 0 {
			return buf, nil
		}
		buf = buf[:len(buf)+n]
	}
}
