package sockets

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ReusePort reports whether fd is a listening TCP socket with SO_REUSEPORT
// set, one that other sockets bound to its address can join in the
// kernel's reuseport group.
func ReusePort(fd int) bool {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil || typ != unix.SOCK_STREAM {
		return false
	}
	if _, err := QueueLen(fd); err != nil {
		return false // not TCP, or not listening
	}
	v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT)
	return err == nil && v == 1
}

// JoinGroup opens a new listening socket in base's reuseport group: the
// same family, SO_REUSEPORT, bound to base's address (the port the kernel
// chose for port 0), listening with the kernel's maximum backlog, as Go's
// net.Listen does. The kernel appends it to the group's array at listen().
// The fd is close-on-exec and non-blocking.
func JoinGroup(base int) (int, error) {
	sa, err := unix.Getsockname(base)
	if err != nil {
		return -1, fmt.Errorf("reuseport group of fd %d: getsockname: %w", base, err)
	}
	dom, err := unix.GetsockoptInt(base, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return -1, fmt.Errorf("reuseport group of fd %d: SO_DOMAIN: %w", base, err)
	}
	fd, err := unix.Socket(dom, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return -1, fmt.Errorf("reuseport group of fd %d: socket: %w", base, err)
	}
	if err := joinSetup(fd, base, dom, sa); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("reuseport group of fd %d: %w", base, err)
	}
	return fd, nil
}

func joinSetup(fd, base, dom int, sa unix.Sockaddr) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return fmt.Errorf("SO_REUSEADDR: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
		return fmt.Errorf("SO_REUSEPORT: %w", err)
	}
	if dom == unix.AF_INET6 {
		// The group is keyed on the address and its v6-only flag.
		v6, err := unix.GetsockoptInt(base, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY)
		if err == nil {
			unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, v6)
		}
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fmt.Errorf("bind: %w", err)
	}
	if err := unix.Listen(fd, maxBacklog()); err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	return nil
}

// maxBacklog is net.core.somaxconn, the cap the kernel puts on a backlog.
func maxBacklog() int {
	b, err := os.ReadFile("/proc/sys/net/core/somaxconn")
	if n, perr := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && perr == nil && n > 0 {
		return n
	}
	return unix.SOMAXCONN
}

// Steer attaches to fd's reuseport group a classic BPF program that sends
// every new connection to the socket at index in the group's array
// (SO_ATTACH_REUSEPORT_CBPF, Linux 4.5, no privilege needed). An index the
// array does not have falls back to the kernel's hash.
func Steer(fd, index int) error {
	prog := []unix.SockFilter{{Code: unix.BPF_RET | unix.BPF_K, K: uint32(index)}}
	fp := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	_, _, errno := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_CBPF,
		uintptr(unsafe.Pointer(&fp)), unsafe.Sizeof(fp), 0)
	if errno != 0 {
		return fmt.Errorf("fd %d: SO_ATTACH_REUSEPORT_CBPF: %w", fd, errno)
	}
	return nil
}

// Unsteer detaches the group's program (SO_DETACH_REUSEPORT_BPF, Linux
// 5.3): new connections are spread by the kernel's hash again.
func Unsteer(fd int) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DETACH_REUSEPORT_BPF, 0); err != nil {
		return fmt.Errorf("fd %d: SO_DETACH_REUSEPORT_BPF: %w", fd, err)
	}
	return nil
}

// Inode is the inode number of fd's socket, as /proc/net/tcp and the fd
// tables under /proc name it.
func Inode(fd int) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, fmt.Errorf("fd %d: %w", fd, err)
	}
	return st.Ino, nil
}

// BindReusePort binds spec as Bind does and, for a TCP address, with
// SO_REUSEPORT set, so that each generation of workers can get its own
// socket in the group (JoinGroup). A TCP address some socket already holds
// is refused as Bind refuses it, even one in a reuseport group of the same
// user, which SO_REUSEPORT alone would let this socket join: it is checked
// first by a bind without the option.
func BindReusePort(spec Spec) (*Socket, error) {
	if !strings.HasPrefix(spec.Network, "tcp") {
		return Bind(spec)
	}
	if _, port, err := net.SplitHostPort(spec.Address); err == nil && port != "0" {
		probe, err := Bind(spec)
		if err != nil {
			return nil, err
		}
		probe.Close()
	}
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	// Go's listeners are MPTCP by default (Go 1.24), and the kernel
	// refuses a reuseport program on an MPTCP socket (EOPNOTSUPP); the
	// group's other members are plain TCP too.
	lc.SetMultipathTCP(false)
	l, err := lc.Listen(context.Background(), spec.Network, spec.Address)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", spec, err)
	}
	defer l.Close()
	fd, err := DupFD(l.(syscall.Conn))
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", spec, err)
	}
	return &Socket{Spec: spec, FD: fd, Own: true}, nil // as Bind's: a stop filters it
}
