// Package inherit is the worker side of socket activation: it obtains the
// listeners a process was given through LISTEN_FDS (sd_listen_fds(3)), or
// binds fresh ones when none were given so that the same binary also runs on
// its own, and tells the supervisor when the process is ready (sd_notify(3)).
package inherit

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"syscall"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

// Set is the fds a process inherited. Each is handed out at most once.
type Set struct {
	files []*os.File
	used  []bool
}

// New reads LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES once and unsets them
// so that children do not inherit them (sd_listen_fds(3) with unset_environment).
// When LISTEN_PID names another process, or the variables are absent, the
// Set is empty and every Listen binds fresh. It returns an error when
// LISTEN_FDS names an fd that is not an open socket.
func New() (*Set, error) {
	want := os.Getenv("LISTEN_FDS")
	files := activation.Files(true) // read once: each call consumes the variables
	s := &Set{files: files, used: make([]bool, len(files))}
	for i, f := range files {
		var st unix.Stat_t
		err := control(f, func(fd int) error { return unix.Fstat(fd, &st) })
		if err != nil {
			return nil, fmt.Errorf("LISTEN_FDS=%s: fd %d (%s) is not open: %w", want, 3+i, f.Name(), err)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
			return nil, fmt.Errorf("LISTEN_FDS=%s: fd %d (%s) is not a socket", want, 3+i, f.Name())
		}
	}
	return s, nil
}

// Names lists the inherited fds' names (LISTEN_FDNAMES), in fd order.
func (s *Set) Names() []string {
	names := make([]string, len(s.files))
	for i, f := range s.files {
		names[i] = f.Name()
	}
	return names
}

// Inherited reports how many fds were inherited.
func (s *Set) Inherited() int { return len(s.files) }

// Listen returns the inherited stream listener called name, or, when name is
// "", the first inherited stream listener not yet taken. When there is none,
// it binds network/addr (net.Listen). The error names the listener.
func (s *Set) Listen(name, network, addr string) (net.Listener, error) {
	if f := s.take(name, syscall.SOCK_STREAM); f != nil {
		l, err := net.FileListener(f)
		f.Close() // FileListener made its own dup
		if err != nil {
			return nil, fmt.Errorf("inherited listener %q: %w", f.Name(), err)
		}
		return l, nil
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		return nil, fmt.Errorf("listener %q: no inherited fd, and binding %s %s failed: %w", name, network, addr, err)
	}
	return l, nil
}

// ListenPacket is Listen for datagram sockets (udp, unixgram).
func (s *Set) ListenPacket(name, network, addr string) (net.PacketConn, error) {
	if f := s.take(name, syscall.SOCK_DGRAM); f != nil {
		c, err := net.FilePacketConn(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("inherited socket %q: %w", f.Name(), err)
		}
		return c, nil
	}
	c, err := net.ListenPacket(network, addr)
	if err != nil {
		return nil, fmt.Errorf("socket %q: no inherited fd, and binding %s %s failed: %w", name, network, addr, err)
	}
	return c, nil
}

func (s *Set) take(name string, typ int) *os.File {
	for i, f := range s.files {
		if s.used[i] || (name != "" && f.Name() != name) {
			continue
		}
		var t int
		err := control(f, func(fd int) (err error) {
			t, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
			return err
		})
		if err != nil || t != typ {
			continue
		}
		s.used[i] = true
		return f
	}
	return nil
}

// Ready tells the supervisor (or systemd) that the process serves: READY=1
// on $NOTIFY_SOCKET (sd_notify(3)). Without NOTIFY_SOCKET it does nothing
// and returns nil.
func Ready() error { return Notify("READY=1") }

// Notify sends state, newline-separated KEY=VALUE assignments, to
// $NOTIFY_SOCKET (sd_notify(3)). Without NOTIFY_SOCKET it returns nil.
func Notify(state string) error {
	if _, err := daemon.SdNotify(false, state); err != nil {
		return fmt.Errorf("sd_notify %q to NOTIFY_SOCKET=%s: %w", state, os.Getenv("NOTIFY_SOCKET"), err)
	}
	return nil
}

// Generation is the worker's generation (UPGRADER_GENERATION), or 0 when
// not run by upgrader.
func Generation() int {
	n, _ := strconv.Atoi(os.Getenv("UPGRADER_GENERATION"))
	return n
}

// control runs fn on f's fd without (*os.File).Fd, which would switch the
// socket, shared with the supervisor and the other workers, to blocking mode.
func control(f *os.File, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}
