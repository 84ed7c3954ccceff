package supervise

import (
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/sockets"
)

// Listener is a listening socket the supervisor holds for the life of the
// service and passes to the workers (fds 3, 4, … in Config.Listeners
// order, named in LISTEN_FDNAMES, sd_listen_fds(3)). The supervisor keeps
// a plain non-blocking fd and never accepts from it. The workers of a
// generation share one socket, so no queued connection is lost when a
// worker goes; with Config.ListenerPerGeneration a TCP listener's later
// generations each get a socket of their own in its SO_REUSEPORT group,
// held open by the supervisor until the stop (steer.go), and otherwise
// every generation shares the listener's.
type Listener struct {
	sock *sockets.Socket
}

// Listen binds addr, in the syntax of upgrader's --listen:
//
//	[NAME=]tcp://HOST:PORT | tcp4://… | tcp6://… | udp://HOST:PORT | udp4://… | udp6://…
//	[NAME=]unix:///PATH | unixgram:///PATH | unix://@ABSTRACT
//	[NAME=]HOST:PORT  (tcp)
//
// NAME is the worker's LISTEN_FDNAMES entry (at most 255 printable ASCII
// characters, no ':'); without it a name is derived from the address,
// such as "tcp-127.0.0.1-8080". A Unix socket path left by a crash is
// replaced; one with a live listener behind it is an error. Errors name
// addr.
func Listen(addr string) (*Listener, error) {
	spec, err := sockets.ParseSpec(addr)
	if err != nil {
		return nil, err
	}
	sock, err := sockets.Bind(spec)
	if err != nil {
		return nil, err
	}
	return &Listener{sock: sock}, nil
}

// FileListener takes over f, a listening socket the program inherited
// (from systemd's LISTEN_FDS, say), under name ("": the file's name): the
// Listener keeps a duplicate, and f is closed.
func FileListener(f *os.File, name string) (*Listener, error) {
	sock, err := sockets.AdoptFile(f, int(f.Fd()))
	if err != nil {
		return nil, fmt.Errorf("listener %q: %w", name, err)
	}
	if name != "" {
		if !sockets.ValidName(name) {
			sock.Close()
			return nil, fmt.Errorf("listener name %q: want at most 255 printable ASCII characters, no ':' (sd_listen_fds_with_names(3))", name)
		}
		sock.Spec.Name = name
	}
	return &Listener{sock: sock}, nil
}

// SocketListener wraps a socket that upgrader's own command line bound or
// adopted (internal/sockets); programs use Listen or FileListener.
func SocketListener(s *sockets.Socket) *Listener { return &Listener{sock: s} }

// Name is the listener's LISTEN_FDNAMES entry.
func (l *Listener) Name() string { return l.sock.Spec.Name }

// Network is tcp, tcp4, tcp6, unix, udp, udp4, udp6 or unixgram.
func (l *Listener) Network() string { return l.sock.Spec.Network }

// Addr is the bound address (the port the kernel chose for port 0).
func (l *Listener) Addr() string { return l.sock.Addr() }

// Close closes the supervisor's copy (and removes a Unix socket path it
// bound). The supervisor closes its copies itself when a stop drains; a
// second Close is a no-op.
func (l *Listener) Close() error { return l.sock.Close() }

// Socket is the socket behind l, for upgrader's own command line.
func (l *Listener) Socket() *sockets.Socket { return l.sock }

// listenerInodes returns the inodes of ls's sockets, as the fd tables of
// the workers that hold them name them; one that cannot be read is left
// out (no worker is then refused for it).
func listenerInodes(ls []*Listener) map[string]struct{} {
	out := map[string]struct{}{}
	for _, l := range ls {
		if in, ok := inodeOf(l.sock.FD); ok {
			out[in] = struct{}{}
		}
	}
	return out
}

// inodeOf returns the inode of fd's file as fd tables name it
// ("socket:[INODE]"); ok is false when fd cannot be fstat'ed.
func inodeOf(fd int) (string, bool) {
	var st unix.Stat_t
	if fd < 0 || unix.Fstat(fd, &st) != nil {
		return "", false
	}
	return strconv.FormatUint(st.Ino, 10), true
}
