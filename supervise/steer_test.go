package supervise

import (
	"log/slog"
	"net"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/sockets"
)

// steerHarness is a supervisor with one listener per generation on a real
// socket, without a loop: the group code runs on the real kernel.
func steerHarness(t *testing.T) (*Supervisor, *Listener) {
	t.Helper()
	sock, err := sockets.BindReusePort(sockets.Spec{Name: "t", Network: "tcp4", Address: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	l := SocketListener(sock)
	t.Cleanup(func() { l.Close() })
	s := &Supervisor{cfg: Config{Listeners: []*Listener{l}, ListenerPerGeneration: true}, log: slog.New(slog.DiscardHandler),
		listenInodes: listenerInodes([]*Listener{l})}
	s.steer = steering{socks: map[*generation][]int{}, quiet: map[*generation]struct{}{}, groups: make([]*group, 1)}
	s.initGroups()
	if s.steer.groups[0] == nil || s.steer.groups[0].broken {
		t.Fatal("no group for a TCP listener with SO_REUSEPORT")
	}
	return s, l
}

// lands dials l n times and fails unless every connection is queued on fd.
func lands(t *testing.T, l *Listener, fd, n int) {
	t.Helper()
	before, err := sockets.QueueLen(fd)
	if err != nil {
		t.Fatal(err)
	}
	for range n {
		c, err := net.Dial("tcp", l.Addr())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
	}
	if after, _ := sockets.QueueLen(fd); after-before != n {
		t.Fatalf("%d of %d connections queued on the steered socket", after-before, n)
	}
}

// Each generation gets a socket no live generation holds, the newest one
// every new connection, and the socket of a generation that has exited is
// taken again by a later one, so that no socket leaves the group (the
// array, and the program's index, never change under the steering). The
// listener's own socket serves generation 1 only: once the group has been
// steered it stays idle, behind the others in the kernel's list.
func TestGroupSocketsPerGeneration(t *testing.T) {
	s, l := steerHarness(t)
	gens := make([]*generation, 5)
	for i := range gens {
		gens[i] = &generation{GenerationRecord: GenerationRecord{N: i + 1}}
	}
	promote := func(g *generation) {
		s.gens.current = g
		s.steerTo(g)
		lands(t, l, s.genSocket(g, 0), 3)
	}
	if fd := s.groupSockets(gens[0])[0]; fd != l.sock.FD {
		t.Fatalf("generation 1 got fd %d, want the listener's own %d", fd, l.sock.FD)
	}
	promote(gens[0])
	seen := map[int]bool{l.sock.FD: true}
	for _, g := range gens[1:3] {
		fd := s.groupSockets(g)[0]
		if seen[fd] {
			t.Fatalf("generation %d got fd %d, which a live generation holds", g.N, fd)
		}
		seen[fd] = true
		promote(g)
	}
	s.closeGenSockets(gens[0]) // exited, with 3 connections left in the listener's queue
	probe := &generation{GenerationRecord: GenerationRecord{N: 99}}
	if fd := s.groupSockets(probe)[0]; fd != l.sock.FD {
		t.Fatalf("a generation chosen while connections wait in the listener's queue got fd %d, want the listener's %d", fd, l.sock.FD)
	}
	delete(s.steer.socks, probe)
	for range 3 {
		nfd, _, err := unix.Accept4(l.sock.FD, unix.SOCK_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		unix.Close(nfd)
	}
	// Its queue empty, the listener's socket is left idle.
	if fd := s.groupSockets(gens[3])[0]; fd == l.sock.FD || seen[fd] {
		t.Fatalf("generation 4 got fd %d, want a new one: the listener's %d once steered, or one a live generation holds", fd, l.sock.FD)
	}
	promote(gens[3])
	free := s.genSocket(gens[1], 0)
	s.closeGenSockets(gens[1]) // exited: its socket is free
	s.closeGenSockets(gens[2])
	if fd := s.groupSockets(gens[4])[0]; fd != free {
		t.Fatalf("generation 5 got fd %d, want the free %d of generation 2", fd, free)
	}
	promote(gens[4])
	if n := len(s.steer.groups[0].members); n != 4 {
		t.Fatalf("the group has %d sockets after 5 generations, at most 3 alive at once, want 4 with the listener's", n)
	}
	// The sockets of a stop are closed; the listener's with the listener.
	s.closeOwnSockets()
	for _, m := range s.steer.groups[0].members {
		if m.fd != l.sock.FD && !m.closed {
			t.Fatalf("socket %d still open after the stop closed them", m.fd)
		}
	}
}

// A socket of another process in the group makes the mirror unknown: the
// program is detached and the next generation shares the listener's own
// socket.
func TestGroupWithAForeignMemberBreaks(t *testing.T) {
	s, l := steerHarness(t)
	g1, g2 := &generation{GenerationRecord: GenerationRecord{N: 1}}, &generation{GenerationRecord: GenerationRecord{N: 2}}
	s.groupSockets(g1)
	s.gens.current = g1
	s.steerTo(g1)
	joinForeign(t, l)
	s.groupSockets(g2)
	s.steerTo(g2)
	if !s.steer.groups[0].broken {
		t.Fatal("a group with a member the supervisor did not open is not broken")
	}
	s.closeGenSockets(g1)
	if fd := s.groupSockets(&generation{GenerationRecord: GenerationRecord{N: 3}})[0]; fd != l.sock.FD {
		t.Fatalf("generation 3 of a broken group got fd %d, want the listener's own %d", fd, l.sock.FD)
	}
}

// A socket that joins a steered group has its idle reference count read
// then. Once it is an old generation's, a handshake held in SYN_RECV on it
// holds the drain, and once accepted it does not; a count above the idle
// one that the dump does not explain (here a connection queued, which the
// poll's queue check covers) holds no drain; the listener's own socket,
// which joined nothing, is asked by the dump.
func TestHandshakesPendingByTheIdleCount(t *testing.T) {
	s, l := steerHarness(t)
	gens := []*generation{{GenerationRecord: GenerationRecord{N: 1}}, {GenerationRecord: GenerationRecord{N: 2}}, {GenerationRecord: GenerationRecord{N: 3}}}
	if fd := promoted(s, gens[0]); fd != l.sock.FD {
		t.Fatalf("generation 1 got fd %d, want the listener's %d", fd, l.sock.FD)
	}
	gr := s.steer.groups[0]
	if gr.member(l.sock.FD).idleRefs != 0 {
		t.Fatal("the listener's own socket has an idle count, though it joined no group")
	}
	old := s.groupSockets(gens[1])[0]
	idle := gr.member(old).idleRefs
	if want, err := sockets.ListenerRefs(old); err != nil || idle == 0 || idle != want {
		t.Fatalf("idle count of a socket that joined the steered group: %d, want the count %d (%v)", idle, want, err)
	}
	if err := unix.SetsockoptInt(old, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 30); err != nil {
		t.Fatal(err)
	}
	s.gens.current = gens[1]
	s.steerTo(gens[1])
	dial := func() net.Conn {
		c, err := net.Dial("tcp", l.Addr())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	held := dial() // SYN_RECV on old once its client is connected
	promoted(s, gens[2])
	fds, grs := []int{old}, []*group{gr}
	if !handshakesPending(fds, grs) {
		t.Fatal("a handshake held in SYN_RECV on the old socket: not pending")
	}
	if _, err := held.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	waitQueued(t, old, 1)
	if handshakesPending(fds, grs) {
		t.Fatal("pending with the handshake completed into the queue: the count is above the idle one, but the dump finds no handshake")
	}
	nfd, _, err := unix.Accept4(old, unix.SOCK_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(nfd)
	if handshakesPending(fds, grs) || gr.member(old).idleRefs != idle {
		t.Fatalf("once accepted: pending, or the idle count moved from %d to %d", idle, gr.member(old).idleRefs)
	}
	// The listener's own socket, steered to again for a handshake.
	if err := unix.SetsockoptInt(l.sock.FD, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 30); err != nil {
		t.Fatal(err)
	}
	if err := sockets.Steer(l.sock.FD, gr.index(l.sock.FD)); err != nil {
		t.Fatal(err)
	}
	dial()
	s.steerTo(gens[2])
	if !handshakesPending([]int{l.sock.FD}, grs) {
		t.Fatal("a handshake held on the listener's own socket: not pending")
	}
}

func waitQueued(t *testing.T, fd, n int) {
	t.Helper()
	for range 5000 {
		if q, err := sockets.QueueLen(fd); err == nil && q >= n {
			return
		}
		unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 1)
	}
	t.Fatalf("fewer than %d connections queued on fd %d after 5s", n, fd)
}

// promoted chooses g's sockets and makes g the current generation, new
// connections steered to it; it returns g's socket.
func promoted(s *Supervisor, g *generation) int {
	fd := s.groupSockets(g)[0]
	s.gens.current = g
	s.steerTo(g)
	return fd
}

// joinForeign adds to l's group a socket the supervisor did not open, as
// another process of the same user binding the address would.
func joinForeign(t *testing.T, l *Listener) {
	t.Helper()
	fd, err := sockets.JoinGroup(l.sock.FD)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
}

// A group that breaks while the current generation has a socket of its
// own (the listener's left idle) asks for an upgrade, whose generation
// shares the listener's socket, to which the kernel's hash now sends a
// share of new connections; one that breaks while the current generation
// shares the listener's asks for none.
func TestBrokenGroupUpgradesWhenNobodyAcceptsFromTheListener(t *testing.T) {
	for _, tc := range []struct {
		name    string
		current int // the generation current when the group breaks
		upgrade bool
	}{
		{"current has its own socket", 2, true},
		{"current shares the listener's", 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, l := steerHarness(t)
			s.reexec.cur = &selfUpgrade{} // an upgrade asked for is queued, not started
			g1, g2 := &generation{GenerationRecord: GenerationRecord{N: 1}}, &generation{GenerationRecord: GenerationRecord{N: 2}}
			promoted(s, g1)
			if tc.current == 2 {
				promoted(s, g2)
				s.closeGenSockets(g1)
			} else {
				s.groupSockets(g2)
			}
			joinForeign(t, l)
			s.recheck(s.steer.groups[0])
			if !s.steer.groups[0].broken {
				t.Fatal("a group with a member the supervisor did not open is not broken")
			}
			if s.upgrades.queued != tc.upgrade {
				t.Fatalf("upgrade asked for: %v, want %v", s.upgrades.queued, tc.upgrade)
			}
		})
	}
}

// A group that breaks while a generation's sockets are chosen asks for no
// upgrade (that generation gets the listener's socket); if it then fails,
// failGeneration's holdListeners asks for one, and a second failure asks
// for none (a release that cannot start must not loop).
func TestBrokenGroupWhileJoiningAsksAgainOnceIfThatGenerationFails(t *testing.T) {
	s, l := steerHarness(t)
	s.reexec.cur = &selfUpgrade{} // an upgrade asked for is queued, not started
	g1, g2, g3 := &generation{GenerationRecord: GenerationRecord{N: 1}}, &generation{GenerationRecord: GenerationRecord{N: 2}}, &generation{GenerationRecord: GenerationRecord{N: 3}}
	promoted(s, g1)
	promoted(s, g2)
	s.closeGenSockets(g1)
	joinForeign(t, l)
	if fd := s.groupSockets(g3)[0]; fd != l.sock.FD || !s.steer.groups[0].broken {
		t.Fatalf("generation 3, chosen as the group broke, got fd %d (broken %v), want the listener's %d", fd, s.steer.groups[0].broken, l.sock.FD)
	}
	if s.upgrades.queued {
		t.Fatal("an upgrade asked for while generation 3, which gets the listener's socket, was chosen")
	}
	s.closeGenSockets(g3) // failed
	s.holdListeners()
	if !s.upgrades.queued {
		t.Fatal("no upgrade asked for once the generation that would share the listener's socket failed")
	}
	s.upgrades.queued = false
	s.holdListeners()
	if s.upgrades.queued {
		t.Fatal("an upgrade asked for a second time since the break")
	}
}
