package sockets

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Socket is a listener held by the supervisor as a plain fd: close-on-exec,
// non-blocking, and never accepted from. Workers get it dup2'ed to fd 3+i.
type Socket struct {
	Spec Spec
	// FD is the supervisor's copy. It stays open until Close, which the
	// supervisor calls when a stop begins to drain (see
	// supervise.Supervisor's closeListeners) and again, as a no-op, at exit.
	FD int
	// unlink is the filesystem path to remove on Close (Unix sockets we bound).
	unlink string
	// closedAddr is Addr as it was when Close ran (FD is -1 since).
	closedAddr string
	// Own: no one but this upgrader (and its fd store) keeps the socket
	// for a next start, so that a stop may make it refuse new connections
	// before the drain (RefuseNewConnections, Unlink). Bind sets it; an
	// inherited socket (Adopt) has it unset, for a socket unit's socket
	// must keep taking connections for the next start, which they trigger.
	Own bool
}

// Bind creates the listener for spec. A Unix socket path that exists but has
// no listener behind it (left by a crash) is replaced; one that answers is an
// error, as is a TCP or UDP address in use. Errors name the address.
func Bind(spec Spec) (*Socket, error) {
	var lc net.ListenConfig
	// Plain TCP, not Go's default MPTCP (since Go 1.24, where the kernel
	// has it): an MPTCP listener takes no socket filter (SO_ATTACH_FILTER
	// fails with EOPNOTSUPP, so a stop could not refuse new connections
	// before its drain) nor a reuseport program, and workers in any
	// language expect the TCP socket LISTEN_FDS promises.
	lc.SetMultipathTCP(false)
	ctx := context.Background()
	if (spec.Network == "unix" || spec.Network == "unixgram") && spec.Address[0] == '/' {
		if err := RemoveStale(spec.Address, spec.Network == "unix"); err != nil {
			return nil, fmt.Errorf("listen on %s: %w", spec, err)
		}
	}
	var sc syscall.Conn
	var closer interface{ Close() error }
	if spec.Stream() {
		l, err := lc.Listen(ctx, spec.Network, spec.Address)
		if err != nil {
			return nil, fmt.Errorf("listen on %s: %w", spec, err)
		}
		if ul, ok := l.(*net.UnixListener); ok {
			ul.SetUnlinkOnClose(false) // the supervisor's dup lives on
		}
		sc, closer = l.(syscall.Conn), l
	} else {
		pc, err := lc.ListenPacket(ctx, spec.Network, spec.Address)
		if err != nil {
			return nil, fmt.Errorf("listen on %s: %w", spec, err)
		}
		sc, closer = pc.(syscall.Conn), pc
	}
	defer closer.Close()
	fd, err := DupFD(sc)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", spec, err)
	}
	s := &Socket{Spec: spec, FD: fd, Own: true}
	if (spec.Network == "unix" || spec.Network == "unixgram") && spec.Address[0] == '/' {
		s.unlink = spec.Address
	}
	return s, nil
}

// DupFD returns a close-on-exec duplicate of c's fd, taken through
// SyscallConn so that the original stays in non-blocking mode ((*os.File).Fd
// would switch the shared file description to blocking).
func DupFD(c syscall.Conn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	nfd := -1
	var derr error
	if err := rc.Control(func(fd uintptr) {
		nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, fmt.Errorf("F_DUPFD_CLOEXEC: %w", derr)
	}
	return nfd, nil
}

// Adopt wraps an fd received from outside (systemd's LISTEN_FDS) as a Socket
// named name, after checking that it is a socket; it is made close-on-exec and
// non-blocking. The error names the fd.
func Adopt(fd int, name string) (*Socket, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("inherited fd %d (%s): %w", fd, name, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return nil, fmt.Errorf("inherited fd %d (%s) is not a socket", fd, name)
	}
	unix.CloseOnExec(fd)
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("inherited fd %d (%s): %w", fd, name, err)
	}
	spec := Spec{Name: name}
	if sa, err := unix.Getsockname(fd); err == nil {
		typ, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
		spec.Network, spec.Address = describe(sa, typ)
	}
	return &Socket{Spec: spec, FD: fd}, nil
}

func describe(sa unix.Sockaddr, typ int) (network, address string) {
	dgram := typ == unix.SOCK_DGRAM
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		network = map[bool]string{false: "tcp4", true: "udp4"}[dgram]
		address = net.JoinHostPort(net.IP(a.Addr[:]).String(), fmt.Sprint(a.Port))
	case *unix.SockaddrInet6:
		network = map[bool]string{false: "tcp6", true: "udp6"}[dgram]
		address = net.JoinHostPort(net.IP(a.Addr[:]).String(), fmt.Sprint(a.Port))
	case *unix.SockaddrUnix:
		network = map[bool]string{false: "unix", true: "unixgram"}[dgram]
		address = a.Name
	}
	return network, address
}

// Addr is the address the socket is bound to now (useful after port 0).
func (s *Socket) Addr() string {
	if s.FD < 0 {
		return s.closedAddr
	}
	sa, err := unix.Getsockname(s.FD)
	if err != nil {
		return s.Spec.Address
	}
	_, a := describe(sa, 0)
	return a
}

// Close closes the supervisor's copy and removes a Unix socket file it bound.
// It is idempotent: a second Close does nothing, so that an fd number
// reused since is never closed by mistake.
func (s *Socket) Close() error {
	if s.FD < 0 {
		return nil
	}
	s.closedAddr = s.Addr()
	err := unix.Close(s.FD)
	s.FD = -1
	if s.unlink != "" {
		os.Remove(s.unlink)
	}
	return err
}

// ErrInUse is what RemoveStale returns, wrapped with the path, when a
// server answers at the path.
var ErrInUse = errors.New("address already in use: a server answers there")

// RemoveStale removes the Unix socket file at path when nothing listens
// behind it (a crash or a SIGKILL left it). It returns an error wrapping
// ErrInUse when a server answers there (probe: stream sockets only), and an
// error when path is not a socket or the probe fails for another reason
// than a refused connection (say, permission denied): only a refusal proves
// the file stale.
func RemoveStale(path string, probe bool) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket", path)
	}
	if probe {
		c, err := net.Dial("unix", path)
		switch {
		case err == nil:
			c.Close()
			return fmt.Errorf("%s: %w", path, ErrInUse)
		case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, os.ErrNotExist):
		default:
			return fmt.Errorf("%s: cannot tell whether a server answers there: %w", path, err)
		}
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing stale socket: %w", err)
	}
	return nil
}

// AdoptFile adopts an inherited socket (from go-systemd's activation.Files)
// as a Socket: it keeps a close-on-exec duplicate and closes f.
func AdoptFile(f *os.File, fd int) (*Socket, error) {
	defer f.Close()
	nfd, err := DupFD(f)
	if err != nil {
		return nil, fmt.Errorf("inherited fd %d (%s): %w", fd, f.Name(), err)
	}
	s, err := Adopt(nfd, f.Name())
	if err != nil {
		unix.Close(nfd)
		return nil, fmt.Errorf("inherited fd %d: %w", fd, err)
	}
	return s, nil
}

// UnlinkPath is the Unix socket file Close removes ("" for none).
func (s *Socket) UnlinkPath() string { return s.unlink }

// Restored rebuilds a Socket carried across a self-upgrade (an exec of a
// new upgrader binary): fd is the listener, unlink what Close removes.
func Restored(spec Spec, fd int, unlink string) *Socket {
	unix.CloseOnExec(fd)
	return &Socket{Spec: spec, FD: fd, unlink: unlink}
}
