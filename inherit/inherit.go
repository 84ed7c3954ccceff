package inherit

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"

	"github.com/cloudflare/tableflip"
	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/workerenv"
)

// HandoffEnv names the variable by which upgrader passes the handoff
// channel's fd (docs/reference/handoff.md). New reads it once and unsets it.
const HandoffEnv = workerenv.HandoffFD

// Set is the fds a process inherited: the sockets of LISTEN_FDS and the
// handoff channel of UPGRADER_HANDOFF_FD. The Set owns them from New on;
// each socket is handed out at most once, and the Set then closes its own
// copy. Its methods are safe for concurrent use.
type Set struct {
	log *slog.Logger
	lc  net.ListenConfig

	mu        sync.Mutex
	files     []*os.File
	used      []bool
	inherited []namedSock // the listeners and packet conns made of inherited fds

	// The handoff channel: its fd (-1 when there is none), why it cannot
	// be used, and the Handoffs made of it.
	handoffFD  int
	handoffErr error
	handoffs   *Handoffs

	// Embedded mode (embed.go): the options asked for, and the mode once
	// on (nil under upgrader, or when not asked for).
	upgradeOpts *tableflip.Options
	emb         *embedded
}

// Option configures New.
type Option func(*Set)

// WithLogger sends the Set's reports to log: fresh binds (Debug), handoff
// messages dropped as malformed and handed-off connections that could not
// be turned into a net.Conn (Warn). Without it, or with nil, the package
// reports nothing: it never writes to stderr or the global logger.
func WithLogger(log *slog.Logger) Option {
	return func(s *Set) {
		if log != nil {
			s.log = log
		}
	}
}

// WithListenConfig makes Listen and ListenPacket bind fresh sockets with lc
// (socket options through lc.Control, keep-alive settings) when none is
// inherited. Inherited sockets are used as they are.
func WithListenConfig(lc net.ListenConfig) Option {
	return func(s *Set) { s.lc = lc }
}

// New reads LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES (sd_listen_fds(3), as
// go-systemd's activation.Files(true) does) and UPGRADER_HANDOFF_FD once,
// unsets them so that children do not inherit them, and takes ownership of
// the fds they name (made close-on-exec). When LISTEN_PID names another
// process, or the variables are absent, the Set holds no sockets and every
// Listen binds fresh.
//
// It returns an error naming the variable and fd when LISTEN_FDS names an
// fd that is not an open socket. A bad UPGRADER_HANDOFF_FD does not fail
// New, since a worker need not take handoffs: Handoffs reports it.
func New(opts ...Option) (*Set, error) {
	s := &Set{log: slog.New(slog.DiscardHandler), handoffFD: -1}
	for _, o := range opts {
		o(s)
	}
	want := os.Getenv(workerenv.ListenFDs)
	if err := checkFDNames(want); err != nil {
		for _, f := range activation.Files(true) {
			f.Close()
		}
		return nil, err
	}
	// Read once: activation.Files unsets the variables, so a second reader
	// (go-systemd's own Listeners, a library) finds nothing to take twice.
	files := activation.Files(true)
	s.files, s.used = files, make([]bool, len(files))
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
	s.handoffFD, s.handoffErr = takeHandoffFD()
	if s.upgradeOpts != nil {
		if os.Getenv(workerenv.Generation) != "" {
			s.log.Info("embedded upgrades not turned on: upgrader runs this process and does the upgrades")
		} else if err := newEmbedded(s); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// checkFDNames refuses a LISTEN_FDNAMES meant for this process (LISTEN_PID)
// with not one name per fd of LISTEN_FDS (workerenv.CheckFDNames).
func checkFDNames(fds string) error {
	n, err := strconv.Atoi(fds)
	if err != nil || os.Getenv(workerenv.ListenPID) != strconv.Itoa(os.Getpid()) {
		return nil // not ours, or not a number: activation.Files takes nothing
	}
	names, set := os.LookupEnv(workerenv.ListenFDNames)
	return workerenv.CheckFDNames(fds, n, names, set)
}

// takeHandoffFD reads and unsets UPGRADER_HANDOFF_FD and takes the fd it
// names: from here on the Set alone may close it, so that a later lookup
// never finds the number reused by something else and closes that.
func takeHandoffFD() (int, error) {
	v, ok := os.LookupEnv(HandoffEnv)
	if !ok {
		return -1, nil
	}
	os.Unsetenv(HandoffEnv)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return -1, fmt.Errorf("%s=%q: not an fd number above 2", HandoffEnv, v)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
		return -1, fmt.Errorf("%s=%d: %w", HandoffEnv, fd, err)
	}
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err == nil && typ != unix.SOCK_SEQPACKET {
		err = fmt.Errorf("socket type %d", typ)
	}
	if err == nil {
		var dom int
		if dom, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN); err == nil && dom != unix.AF_UNIX {
			err = fmt.Errorf("address family %d", dom)
		}
	}
	if err != nil {
		// Not ours to close: it is not the channel, so it may be
		// anything the process opened under that number.
		return -1, fmt.Errorf("%s=%d: want an AF_UNIX SOCK_SEQPACKET socket (unix(7)): %w", HandoffEnv, fd, err)
	}
	// A child of the worker must not hold the channel open after the
	// worker exits: upgrader would see no end of it.
	unix.CloseOnExec(fd)
	return fd, nil
}

// Names lists the inherited fds' names (LISTEN_FDNAMES), in fd order,
// listeners, datagram sockets and fd-store entries alike.
func (s *Set) Names() []string {
	names := make([]string, len(s.files))
	for i, f := range s.files {
		names[i] = f.Name()
	}
	return names
}

// Inherited reports whether sock, a net.Listener or net.PacketConn returned
// by this Set, was made of an inherited fd (false: Listen or ListenPacket
// bound it fresh, or it did not come from this Set).
func (s *Set) Inherited(sock any) bool {
	_, ok := s.nameOf(sock)
	return ok
}

// Listeners takes every inherited stream listener (TCP, Unix stream) not
// yet taken, keyed by its LISTEN_FDNAMES name, in fd order within a name,
// as go-systemd's activation.ListenersWithNames does. It binds nothing: the
// map is empty when none was inherited. On an error (an fd that net cannot
// use, named by its LISTEN_FDNAMES name) the listeners taken so far are
// closed and the map is nil.
func (s *Set) Listeners() (map[string][]net.Listener, error) {
	out := map[string][]net.Listener{}
	for {
		l, ok, err := s.listenInherited("")
		if err != nil {
			for _, ls := range out {
				for _, l := range ls {
					l.Close()
				}
			}
			return nil, err
		}
		if !ok {
			return out, nil
		}
		name, _ := s.nameOf(l)
		out[name] = append(out[name], l)
	}
}

// Listen returns the inherited stream listener called name (LISTEN_FDNAMES),
// or, when name is "", the first inherited stream listener not yet taken.
// When there is none it binds network/addr with the Set's net.ListenConfig
// (WithListenConfig); Inherited tells the two cases apart. The error names
// the listener and the address.
func (s *Set) Listen(name, network, addr string) (net.Listener, error) {
	l, ok, err := s.listenInherited(name)
	if err != nil || ok {
		return l, err
	}
	l, err = s.lc.Listen(context.Background(), network, addr)
	if err != nil {
		return nil, fmt.Errorf("listener %q: none inherited, and binding %s %s failed: %w", name, network, addr, err)
	}
	s.log.Debug("no inherited listener; bound a fresh one", "name", name, "addr", l.Addr().String())
	if s.emb != nil {
		if err := s.emb.pass(name, l.(syscall.Conn)); err != nil {
			l.Close()
			return nil, err
		}
	}
	return l, nil
}

func (s *Set) listenInherited(name string) (net.Listener, bool, error) {
	f := s.take(name, syscall.SOCK_STREAM)
	if f == nil {
		return nil, false, nil
	}
	l, err := net.FileListener(f)
	f.Close() // FileListener made its own dup; this copy was ours
	if err != nil {
		return nil, false, fmt.Errorf("inherited listener %q: %w", f.Name(), err)
	}
	s.remember(l, f.Name())
	return l, true, nil
}

// ListenPacket is Listen for datagram sockets (udp, unixgram).
func (s *Set) ListenPacket(name, network, addr string) (net.PacketConn, error) {
	if f := s.take(name, syscall.SOCK_DGRAM); f != nil {
		c, err := net.FilePacketConn(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("inherited socket %q: %w", f.Name(), err)
		}
		s.remember(c, f.Name())
		return c, nil
	}
	c, err := s.lc.ListenPacket(context.Background(), network, addr)
	if err != nil {
		return nil, fmt.Errorf("socket %q: none inherited, and binding %s %s failed: %w", name, network, addr, err)
	}
	s.log.Debug("no inherited socket; bound a fresh one", "name", name, "addr", c.LocalAddr().String())
	if s.emb != nil {
		if err := s.emb.pass(name, c.(syscall.Conn)); err != nil {
			c.Close()
			return nil, err
		}
	}
	return c, nil
}

// namedSock is an inherited socket handed out, with its LISTEN_FDNAMES name.
type namedSock struct {
	sock any
	name string
}

func (s *Set) remember(sock any, name string) {
	s.mu.Lock()
	s.inherited = append(s.inherited, namedSock{sock, name})
	s.mu.Unlock()
}

// nameOf finds sock among the inherited sockets handed out. A slice, not a
// map: a caller's net.Listener of a non-comparable type would make a map
// lookup panic, while == between different dynamic types is just false.
func (s *Set) nameOf(sock any) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, n := range s.inherited {
		if n.sock == sock {
			return n.name, true
		}
	}
	return "", false
}

func (s *Set) take(name string, typ int) *os.File {
	s.mu.Lock()
	defer s.mu.Unlock()
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
// (daemon.SdNotifyReady) on $NOTIFY_SOCKET, sd_notify(3). Without
// NOTIFY_SOCKET it does nothing and returns nil.
//
// In embedded mode (WithUpgrades) it sends MAINPID=<this process> with
// READY=1, so that systemd follows the new process, then calls tableflip's
// Ready, which writes the PID file and lets the parent process drain.
func Ready() error {
	if e := current.Load(); e != nil {
		return e.ready()
	}
	return Notify(daemon.SdNotifyReady)
}

// Notify sends state, newline-separated KEY=VALUE assignments, to
// $NOTIFY_SOCKET (sd_notify(3)); go-systemd's daemon.SdNotifyReady,
// SdNotifyStopping and SdNotifyWatchdog are the common ones. Without
// NOTIFY_SOCKET it returns nil. The variable is left set: the process
// notifies for its whole life. The error names the state and the socket.
//
// In embedded mode, once the process has upgraded (Upgraded), it sends
// nothing: the new process is systemd's main process now, and a STOPPING=1
// from the old one would stop the service.
func Notify(state string) error {
	if e := current.Load(); e != nil && e.done.Load() {
		return nil
	}
	if _, err := daemon.SdNotify(false, state); err != nil {
		return fmt.Errorf("sd_notify %q to NOTIFY_SOCKET=%s: %w", state, os.Getenv(workerenv.NotifySocket), err)
	}
	return nil
}

// Generation is the worker's generation (UPGRADER_GENERATION); in
// embedded mode, 1 for the first process and one more at each upgrade;
// otherwise 0.
func Generation() int {
	if e := current.Load(); e != nil {
		return e.gen
	}
	n, _ := strconv.Atoi(os.Getenv(workerenv.Generation))
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
