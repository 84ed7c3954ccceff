package drain

import (
	"net"
	"os"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/inherit"
	"github.com/seed6cb0314a/upgrader/internal/handoff"
)

// fakeUpgrader is the far end of a real handoff channel (a SOCK_SEQPACKET
// socketpair speaking internal/handoff), standing in for upgrader and the
// taking worker at once: it answers each HANDOFF with ACK or NAK as told.
type fakeUpgrader struct {
	sock *handoff.Socket
	// taken receives the connections of every acknowledged HANDOFF, as the
	// taker would serve them.
	taken chan net.Conn
	// batches receives the size of every HANDOFF.
	batches chan int
}

// newFakeUpgrader opens a handoff channel, points UPGRADER_HANDOFF_FD at
// one end, and returns the worker's inherit.Handoffs for "http". ack
// decides each answer; keep says whether acknowledged connections are
// passed on (taken) or closed at once, as a taker that parks them would
// from the sender's point of view.
func newFakeUpgrader(t testing.TB, ack func() bool, keep bool) (*fakeUpgrader, *inherit.Handoffs) {
	t.Helper()
	sock, h := handoffChannel(t)
	u := &fakeUpgrader{sock: sock, taken: make(chan net.Conn, 20000), batches: make(chan int, 1000)}
	go func() {
		for {
			m, fds, err := sock.Recv()
			if err != nil {
				handoff.CloseFDs(fds)
				return
			}
			if m.Type != handoff.TypeHandoff {
				handoff.CloseFDs(fds)
				continue
			}
			select {
			case u.batches <- len(fds):
			default:
			}
			if !ack() {
				handoff.CloseFDs(fds)
				sock.Send(handoff.Message{Type: handoff.TypeNak, ID: m.ID, Reason: "test refuses"}, nil)
				continue
			}
			sock.Send(handoff.Message{Type: handoff.TypeAck, ID: m.ID}, nil)
			if !keep {
				handoff.CloseFDs(fds)
				continue
			}
			for _, fd := range fds {
				f := os.NewFile(uintptr(fd), "taken")
				c, err := net.FileConn(f)
				f.Close()
				if err != nil {
					panic(err)
				}
				u.taken <- c
			}
		}
	}()
	return u, h
}

// handoffChannel opens a handoff channel, points UPGRADER_HANDOFF_FD at one
// end, and returns upgrader's end, past the ACCEPT, and the worker's
// inherit.Handoffs for "http".
func handoffChannel(t testing.TB) (*handoff.Socket, *inherit.Handoffs) {
	t.Helper()
	ours, theirs, err := handoff.Pair()
	if err != nil {
		t.Fatal(err)
	}
	// inherit wraps the fd in a file of its own and closes it: give it a
	// dup, so that theirs is closed once, here.
	rc, err := theirs.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd int
	var derr error
	rc.Control(func(f uintptr) { fd, derr = unix.Dup(int(f)) })
	theirs.Close()
	if derr != nil {
		t.Fatal(derr)
	}
	t.Setenv("UPGRADER_HANDOFF_FD", strconv.Itoa(fd))
	set, err := inherit.New()
	if err != nil {
		t.Fatal(err)
	}
	h, err := set.Handoffs("http")
	if err != nil || h == nil {
		t.Fatalf("Handoffs: %v, %v", h, err)
	}
	sock, err := handoff.NewSocket(ours)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sock.Close() })
	if m, _, err := sock.Recv(); err != nil || m.Type != handoff.TypeAccept {
		t.Fatalf("first message %+v, %v: want ACCEPT", m, err)
	}
	return sock, h
}
