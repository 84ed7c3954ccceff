package sockets

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// QueueLen is the number of connections waiting in the accept queue of the
// listening TCP socket fd: on a socket in LISTEN, TCP_INFO's tcpi_unacked
// is the accept backlog (tcp_get_info, since Linux 2.6.x).
func QueueLen(fd int) (int, error) {
	ti, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0, fmt.Errorf("fd %d: TCP_INFO: %w", fd, err)
	}
	if ti.State != stateListen {
		return 0, fmt.Errorf("fd %d: not a listening TCP socket (state %d)", fd, ti.State)
	}
	return int(ti.Unacked), nil
}

// stateListen is TCP_LISTEN in include/net/tcp_states.h.
const stateListen = 10
