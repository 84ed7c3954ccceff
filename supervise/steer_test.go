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

// The mirror follows the kernel's array as generations come and go: the
// newest generation's socket gets every new connection, also after an
// older one in the middle of the array has closed (and the last taken
// its index), and the listener's own socket goes to the next generation
// once its generation has exited.
func TestGroupMirrorFollowsTheKernel(t *testing.T) {
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
	alive := func(gs ...*generation) {
		s.gens.all = gs
		for _, g := range gs {
			g.live = map[*worker]struct{}{{}: {}}
		}
	}
	alive(gens[0])
	if fd := s.groupSockets(gens[0])[0]; fd != l.sock.FD {
		t.Fatalf("generation 1 got fd %d, want the listener's own %d", fd, l.sock.FD)
	}
	promote(gens[0])
	for i, g := range gens[1:4] {
		alive(gens[:i+2]...)
		if fd := s.groupSockets(g)[0]; fd == l.sock.FD {
			t.Fatalf("generation %d got the listener's own socket, want its own", g.N)
		}
		promote(g)
	}
	// [own, 2, 3, 4]: closing 2 moves 4 to index 1 (a plain delete of
	// index 1 would leave it at 2), and the program is pointed there.
	s.closeGenSockets(gens[1])
	if n := len(s.steer.groups[0].members); n != 3 {
		t.Fatalf("mirror has %d members, want 3", n)
	}
	lands(t, l, s.genSocket(gens[3], 0), 3)
	s.closeGenSockets(gens[0]) // the listener's own socket stays open
	alive(gens[2], gens[3], gens[4])
	s.groupSockets(gens[4])
	promote(gens[4])
	s.closeGenSockets(gens[2])
	s.closeGenSockets(gens[3])
	if n := len(s.steer.groups[0].members); n != 2 {
		t.Fatalf("mirror has %d members, want 2 (the listener's and generation 5's)", n)
	}
	lands(t, l, s.genSocket(gens[4], 0), 3)
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
	foreign, err := sockets.JoinGroup(l.sock.FD)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(foreign)
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
