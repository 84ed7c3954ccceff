package sockets

import (
	"net"
	"testing"

	"golang.org/x/sys/unix"
)

// queued dials addr n times and returns each group member's accept queue
// length afterwards; the connections stay queued (nobody accepts).
func queued(t *testing.T, addr string, n int, fds []int) []int {
	t.Helper()
	for range n {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("dial %s: %v", addr, err)
		}
		t.Cleanup(func() { c.Close() })
	}
	out := make([]int, len(fds))
	for i, fd := range fds {
		q, err := QueueLen(fd)
		if err != nil {
			t.Fatal(err)
		}
		out[i] = q
	}
	return out
}

// The kernel behaviour the supervisor's mirror of a reuseport group relies
// on: sockets join the array in listen() order, a program's index picks
// the socket, and a member that closes is replaced by the last one.
func TestReusePortSteering(t *testing.T) {
	base, err := BindReusePort(Spec{Name: "t", Network: "tcp4", Address: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	defer base.Close()
	if !ReusePort(base.FD) {
		t.Fatal("BindReusePort's socket has no SO_REUSEPORT")
	}
	a, err := JoinGroup(base.FD)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(a)
	b, err := JoinGroup(base.FD)
	if err != nil {
		t.Fatal(err)
	}
	addr := base.Addr()
	if err := Steer(base.FD, 1); err != nil {
		t.Fatal(err)
	}
	if got := queued(t, addr, 3, []int{base.FD, a, b}); got[0] != 0 || got[1] != 3 || got[2] != 0 {
		t.Fatalf("steered to index 1 (the first joined): queues %v, want [0 3 0]", got)
	}
	if err := Steer(base.FD, 2); err != nil {
		t.Fatal(err)
	}
	if got := queued(t, addr, 2, []int{base.FD, a, b}); got[2] != 2 {
		t.Fatalf("steered to index 2: queues %v, want 2 on the last joined", got)
	}
	// Closing index 0 moves the last (b) into its place.
	var probe unix.Sockaddr
	if probe, err = unix.Getsockname(base.FD); err != nil {
		t.Fatal(err)
	}
	base.Close()
	if err := Steer(a, 0); err != nil {
		t.Fatal(err)
	}
	if got := queued(t, addr, 2, []int{a, b}); got[1] != 4 {
		t.Fatalf("index 0 after closing it: queues %v, want b (the last) there with 4", got)
	}
	_ = probe
	if err := Unsteer(a); err != nil {
		t.Fatal(err)
	}
	unix.Close(b)
}

func TestBindReusePortRefusesAnAddressInUse(t *testing.T) {
	first, err := BindReusePort(Spec{Name: "t", Network: "tcp4", Address: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	if s, err := BindReusePort(Spec{Name: "t", Network: "tcp4", Address: first.Addr()}); err == nil {
		s.Close()
		t.Fatalf("a second BindReusePort of %s joined the first's group", first.Addr())
	}
}

// TestBindersOwnTheirSockets: a socket upgrader binds, with or without
// SO_REUSEPORT, is its own (a stop filters it); one only Bind marked was
// left unfiltered by the other, and the stop reset its queue.
func TestBindersOwnTheirSockets(t *testing.T) {
	for name, bind := range map[string]func(Spec) (*Socket, error){"Bind": Bind, "BindReusePort": BindReusePort} {
		s, err := bind(Spec{Network: "tcp", Address: "127.0.0.1:0"})
		if err != nil {
			t.Fatal(name, err)
		}
		if !s.Own {
			t.Errorf("%s: Own unset", name)
		}
		s.Close()
	}
}
