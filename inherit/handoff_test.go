package inherit

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
	"github.com/seed6cb0314a/upgrader/internal/slogrec"
	"github.com/seed6cb0314a/upgrader/internal/sockets"
	"github.com/seed6cb0314a/upgrader/internal/testnet"
)

// fakeUpgrader gives the test process a handoff channel as upgrader gives
// a worker one: a SOCK_SEQPACKET socket pair, one end's number in
// UPGRADER_HANDOFF_FD. It returns upgrader's end and the worker's fd
// number. Raw fds, not *os.File: the worker's end passes to the code under
// test, and a finalizer of ours must not close that number later.
func fakeUpgrader(t *testing.T) (*handoff.Socket, int) {
	t.Helper()
	up, wfd, raw := fakeUpgraderRaw(t)
	unix.Close(raw)
	return up, wfd
}

// fakeUpgraderRaw is fakeUpgrader, with a raw copy of upgrader's end too,
// for datagrams that handoff.Socket would not send.
func fakeUpgraderRaw(t *testing.T) (up *handoff.Socket, wfd, raw int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(HandoffEnv, strconv.Itoa(fds[1]))
	raw, err = unix.FcntlInt(uintptr(fds[0]), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	up, err = handoff.NewSocket(os.NewFile(uintptr(fds[0]), "upgrader"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { up.Close() })
	return up, fds[1], raw
}

// recv is up.Recv, failing the test after 10 s.
func recv(t *testing.T, up *handoff.Socket) (handoff.Message, []int) {
	t.Helper()
	type res struct {
		m   handoff.Message
		fds []int
		err error
	}
	ch := make(chan res, 1)
	go func() {
		m, fds, err := up.Recv()
		ch <- res{m, fds, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("upgrader's end: %v", r.err)
		}
		return r.m, r.fds
	case <-time.After(10 * time.Second):
		t.Fatal("upgrader's end received nothing in 10s")
	}
	panic("unreachable")
}

// handOff sends conn to the worker as upgrader forwards a HANDOFF, and
// returns the worker's answer. upgrader's copy of the fd is closed.
func handOff(t *testing.T, up *handoff.Socket, id uint64, kind string, conn *net.TCPConn, c handoff.Conn) handoff.Message {
	t.Helper()
	sendHandoff(t, up, id, kind, conn, c)
	m, fds := recv(t, up)
	handoff.CloseFDs(fds)
	return m
}

// sendHandoff is handOff's send alone: the answer is left in up.
func sendHandoff(t *testing.T, up *handoff.Socket, id uint64, kind string, conn *net.TCPConn, c handoff.Conn) {
	t.Helper()
	fd, err := sockets.DupFD(conn)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := up.Send(handoff.Message{Type: handoff.TypeHandoff, ID: id, Kind: kind, Conns: []handoff.Conn{c}}, []int{fd}); err != nil {
		t.Fatal(err)
	}
}

// accept is l.Accept, failing the test after 10 s.
func accept(t *testing.T, l net.Listener) net.Conn {
	t.Helper()
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			t.Errorf("Accept: %v", err)
		}
		ch <- c
	}()
	select {
	case c := <-ch:
		if c == nil {
			t.FailNow()
		}
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("Accept returned nothing in 10s")
	}
	panic("unreachable")
}

// openFDs maps this process's open fds to what they are (readlink of
// /proc/self/fd/N).
func openFDs(t *testing.T) map[int]string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	out := map[int]string{}
	for _, e := range ents {
		fd, _ := strconv.Atoi(e.Name())
		if target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil {
			out[fd] = target
		}
	}
	return out
}

// waitFor polls cond (state, not time) until it holds, for up to 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("never: %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// A second Handoffs looked UPGRADER_HANDOFF_FD up
// again, found the number reused (by the first call's epoll instance, or
// anything the process opened since) and closed it.
func TestHandoffsTwiceClosesNothing(t *testing.T) {
	up, wfd := fakeUpgrader(t)
	s, err := New()
	if err != nil {
		t.Fatal(err)
	}
	h1, err := s.Handoffs("http")
	if err != nil || h1 == nil {
		t.Fatalf("Handoffs: %v, %v", h1, err)
	}
	// Closed before the test ends, not by the cleanup's closing of
	// upgrader's end: its release would then overlap the next test's.
	defer h1.Close()
	if m, _ := recv(t, up); m.Type != handoff.TypeAccept {
		t.Fatalf("first message %+v, want ACCEPT", m)
	}
	// The channel's number is free again (the socket has its own copy):
	// open something there, as the process might.
	if _, err := unix.FcntlInt(uintptr(wfd), unix.F_GETFD, 0); err == unix.EBADF {
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		defer unix.Close(p[0])
		if err := unix.Dup3(p[1], wfd, unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		unix.Close(p[1])
		defer unix.Close(wfd)
	}
	before := openFDs(t)

	h2, err := s.Handoffs("http")
	if err != nil || h2 != h1 {
		t.Errorf("second Handoffs(http) = %p, %v; want the first, %p", h2, err, h1)
	}
	after := openFDs(t)
	for fd, what := range before {
		if after[fd] != what {
			t.Errorf("fd %d (%s) closed or replaced by the second Handoffs", fd, what)
		}
	}
	if v, ok := os.LookupEnv(HandoffEnv); ok {
		t.Errorf("%s=%s still set after New: a child would take it", HandoffEnv, v)
	}
	// Kinds beyond the first call's cannot be added: ACCEPT went once.
	if _, err := s.Handoffs("http", "counter"); err == nil || !strings.Contains(err.Error(), "counter") {
		t.Errorf("Handoffs with a new kind: %v, want an error naming it", err)
	}
	// The first is still served: a connection handed to it arrives.
	sc, cc := testnet.TCPPair(t)
	if m := handOff(t, up, 1, "http", sc, handoff.Conn{State: []byte("s")}); m.Type != handoff.TypeAck {
		t.Fatalf("answer %+v, want ACK", m)
	}
	io.WriteString(cc, "GET / HTTP/1.1\r\n")
	c := accept(t, h1.Listener("http"))
	c.Close()
}

// An UPGRADER_HANDOFF_FD that names something else is
// reported once, naming the variable, and that fd is left open (the old
// code closed whatever lived at the number).
func TestHandoffsBadFDIsNotClosed(t *testing.T) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	t.Setenv(HandoffEnv, strconv.Itoa(p[1]))
	s, err := New()
	if err != nil {
		t.Fatal(err)
	}
	h, err := s.Handoffs("http")
	if h != nil || err == nil {
		t.Fatalf("Handoffs on a pipe: %v, %v; want an error", h, err)
	}
	want := fmt.Sprintf("%s=%d: ", HandoffEnv, p[1])
	if msg := err.Error(); !strings.HasPrefix(msg, want) || strings.Count(strings.ToLower(msg), "handoff") != 1 || !strings.Contains(msg, "SOCK_SEQPACKET") {
		t.Errorf("error %q: want it to start %q, say what was wanted, and not stutter", msg, want)
	}
	if _, err := unix.FcntlInt(uintptr(p[1]), unix.F_GETFD, 0); err != nil {
		t.Fatalf("the fd UPGRADER_HANDOFF_FD named was closed: %v", err)
	}
	if _, err := unix.Write(p[1], []byte("x")); err != nil {
		t.Fatalf("the pipe no longer works: %v", err)
	}
}

// Without UPGRADER_HANDOFF_FD there is no channel: nil, no error, and the
// nil *Handoffs is safe to use.
func TestHandoffsWithoutChannel(t *testing.T) {
	t.Setenv(HandoffEnv, "")
	os.Unsetenv(HandoffEnv)
	s, err := New()
	if err != nil {
		t.Fatal(err)
	}
	h, err := s.Handoffs(KindHTTP)
	if h != nil || err != nil {
		t.Fatalf("Handoffs = %v, %v; want nil, nil", h, err)
	}
	if h.Listener(KindHTTP) != nil || h.Listener(KindHTTP).Pending() != 0 || h.Close() != nil {
		t.Fatal("a nil *Handoffs misbehaves")
	}
	sc, _ := testnet.TCPPair(t)
	if err := h.Send(KindHTTP, []Outgoing{{Conn: sc}}); err != ErrNoHandoff {
		t.Fatalf("Send on nil: %v, want ErrNoHandoff", err)
	}
}

// The taking side. ACCEPT goes at start; a HANDOFF of
// an application kind is acknowledged and its connection comes out of the
// listener with its state, its buffered bytes first; an unknown kind is
// refused.
func TestHandoffsReceive(t *testing.T) {
	up, _ := fakeUpgrader(t)
	h := openHandoffs(t, KindHTTP, "counter")
	if m, _ := recv(t, up); m.Type != handoff.TypeAccept || strings.Join(m.Kinds, ",") != "http,counter" {
		t.Fatalf("first message %+v, want ACCEPT kinds=http,counter", m)
	}

	sc, cc := testnet.TCPPair(t)
	if m := handOff(t, up, 7, "counter", sc, handoff.Conn{State: []byte("5"), Buffered: []byte("abc")}); m.Type != handoff.TypeAck || m.ID != 7 {
		t.Fatalf("answer %+v, want ACK id=7", m)
	}
	sc.Close() // the sender lets go on ACK
	c := accept(t, h.Listener("counter")).(*Conn)
	defer c.Close()
	if c.Kind != "counter" || string(c.State) != "5" || string(c.Pending()) != "abc" {
		t.Fatalf("conn kind=%q state=%q pending=%q", c.Kind, c.State, c.Pending())
	}
	io.WriteString(cc, "def")
	got := make([]byte, 6)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "abcdef" {
		t.Fatalf("read %q, %v; want the buffered bytes, then the socket's", got, err)
	}
	io.WriteString(c, "ok")
	if _, err := io.ReadFull(cc, got[:2]); err != nil || string(got[:2]) != "ok" {
		t.Fatalf("client read %q, %v", got[:2], err)
	}

	sc2, _ := testnet.TCPPair(t)
	if m := handOff(t, up, 8, "other", sc2, handoff.Conn{}); m.Type != handoff.TypeNak || m.ID != 8 || !strings.Contains(m.Reason, "other") {
		t.Fatalf("answer %+v, want NAK id=8 naming the kind", m)
	}
}

// The first eagerConns idle HTTP connections a channel takes are
// converted at once and watched, not parked, and come out of Accept only
// once their clients speak (net/http would start a new connection's
// header timeout at once); the one past them is parked.
func TestHandoffsWatchesTheFirstIdleHTTP(t *testing.T) {
	up, _ := fakeUpgrader(t)
	h := openHandoffs(t, KindHTTP)
	recv(t, up) // ACCEPT
	var fds []int
	var clients []net.Conn
	for range eagerConns + 1 {
		sc, cc := testnet.TCPPair(t)
		fd, err := sockets.DupFD(sc)
		if err != nil {
			t.Fatal(err)
		}
		sc.Close()
		fds, clients = append(fds, fd), append(clients, cc)
	}
	err := up.Send(handoff.Message{Type: handoff.TypeHandoff, ID: 1, Kind: KindHTTP, Conns: make([]handoff.Conn, len(fds))}, fds)
	handoff.CloseFDs(fds)
	if err != nil {
		t.Fatal(err)
	}
	if m, _ := recv(t, up); m.Type != handoff.TypeAck {
		t.Fatalf("answer %+v, want ACK", m)
	}
	waitFor(t, "64 watched and 1 parked", func() bool {
		h.watchMu.Lock()
		watched := len(h.watched)
		h.watchMu.Unlock()
		h.park.mu.Lock()
		defer h.park.mu.Unlock()
		return watched == eagerConns && len(h.park.parked) == 1
	})
	l := h.Listener(KindHTTP)
	l.mu.Lock()
	queued := len(l.queue)
	l.mu.Unlock()
	if queued != 0 || l.Pending() != eagerConns+1 {
		t.Fatalf("before any client spoke: %d queued for Accept, %d pending; want 0 and %d", queued, l.Pending(), eagerConns+1)
	}
	for _, cc := range clients {
		io.WriteString(cc, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	}
	for range eagerConns + 1 {
		c := accept(t, l)
		defer c.Close()
		buf := make([]byte, 4)
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "GET " {
			t.Fatalf("read %q, %v", buf, err)
		}
	}
	if n := l.Pending(); n != 0 {
		t.Fatalf("%d still pending once all were accepted", n)
	}
}

// A listener that closes gets its watched connections at once, working,
// with no deadline left on them, and their goroutines end: closed by
// itself (a drain, the channel still open) or by the channel's Close.
func TestHandoffsCloseDeliversWatched(t *testing.T) {
	for _, by := range []string{"listener", "channel"} {
		t.Run(by, func(t *testing.T) {
			up, _ := fakeUpgrader(t)
			sc, cc := testnet.TCPPair(t)
			goroutines := runtime.NumGoroutine()
			h := openHandoffs(t, KindHTTP)
			recv(t, up) // ACCEPT
			if m := handOff(t, up, 1, KindHTTP, sc, handoff.Conn{}); m.Type != handoff.TypeAck {
				t.Fatalf("answer %+v, want ACK", m)
			}
			watched := func() int {
				h.watchMu.Lock()
				defer h.watchMu.Unlock()
				return len(h.watched)
			}
			waitFor(t, "the connection watched", func() bool { return watched() == 1 })
			l := h.Listener(KindHTTP)
			closed := make(chan error, 1)
			go func() {
				if by == "listener" {
					closed <- l.Close()
				} else {
					closed <- h.Close() // waits for the watchers
				}
			}()
			select {
			case err := <-closed:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("%s Close still waiting after 10s", by)
			}
			c := accept(t, l)
			defer c.Close()
			if n := watched(); n != 0 {
				t.Fatalf("%d still watched once delivered", n)
			}
			// No deadline of ours may be left on it: net/http sets its own.
			// A timer, not a deadline, bounds the read.
			stop := time.AfterFunc(10*time.Second, func() { c.Close() })
			defer stop.Stop()
			io.WriteString(cc, "x")
			if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
				t.Fatalf("the connection watched at Close does not work: %v", err)
			}
			if by == "channel" {
				waitFor(t, "the goroutines gone", func() bool { return runtime.NumGoroutine() <= goroutines })
			}
		})
	}
}

// When upgrader ends the channel (embedded mode: the old process exited),
// idle connections taken stay watched or parked: given to net/http idle,
// they would fall to its ReadHeaderTimeout, which starts at Accept. They
// come out of Accept once their clients speak, or at once when the
// listener closes; then Accept fails (at once for a kind with nothing
// taken) and the channel's goroutines end.
func TestHandoffsChannelEndKeepsIdleWaiting(t *testing.T) {
	for _, by := range []string{"clients", "listener"} {
		t.Run(by, func(t *testing.T) {
			up, _ := fakeUpgrader(t)
			goroutines := runtime.NumGoroutine()
			h := openHandoffs(t, KindHTTP, "ws")
			h.unparked.Store(1) // one watched, one parked
			recv(t, up)         // ACCEPT
			var clients []net.Conn
			for id := range uint64(2) {
				sc, cc := testnet.TCPPair(t)
				if m := handOff(t, up, id+1, KindHTTP, sc, handoff.Conn{}); m.Type != handoff.TypeAck {
					t.Fatalf("answer %+v, want ACK", m)
				}
				sc.Close()
				clients = append(clients, cc)
			}
			l := h.Listener(KindHTTP)
			counts := func() (watched, parked, queued int, ended bool) {
				h.watchMu.Lock()
				watched = len(h.watched)
				h.watchMu.Unlock()
				h.park.mu.Lock()
				parked = len(h.park.parked)
				h.park.mu.Unlock()
				l.mu.Lock()
				defer l.mu.Unlock()
				return watched, parked, len(l.queue), l.ended
			}
			waitFor(t, "one watched and one parked", func() bool { w, p, _, _ := counts(); return w == 1 && p == 1 })
			up.Close()
			waitFor(t, "the listener ended", func() bool { _, _, _, ended := counts(); return ended })
			if w, p, q, _ := counts(); w != 1 || p != 1 || q != 0 || l.Pending() != 2 {
				t.Fatalf("channel ended, clients idle: %d watched, %d parked, %d queued for Accept, %d pending; want 1, 1, 0, 2", w, p, q, l.Pending())
			}
			// Another kind, with nothing taken, is over at once.
			ws := make(chan error, 1)
			go func() { _, err := h.Listener("ws").Accept(); ws <- err }()
			select {
			case err := <-ws:
				if !errors.Is(err, net.ErrClosed) {
					t.Fatalf("Accept of a kind with nothing taken, channel ended: %v, want net.ErrClosed", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("Accept of a kind with nothing taken still waiting 10s after the channel ended")
			}
			if by == "listener" {
				if err := l.Close(); err != nil {
					t.Fatal(err)
				}
				waitFor(t, "both given to Accept, idle", func() bool { _, _, q, _ := counts(); return q == 2 })
			}
			for _, cc := range clients {
				io.WriteString(cc, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			}
			for range clients {
				c := accept(t, l)
				defer c.Close()
				stop := time.AfterFunc(10*time.Second, func() { c.Close() })
				defer stop.Stop()
				buf := make([]byte, 4)
				if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "GET " {
					t.Fatalf("read %q, %v", buf, err)
				}
			}
			if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
				t.Fatalf("Accept once all were returned: %v, want net.ErrClosed", err)
			}
			select {
			case <-h.done:
			case <-time.After(10 * time.Second):
				t.Fatal("the channel still not released 10s after its last connection")
			}
			waitFor(t, "the goroutines gone", func() bool { return runtime.NumGoroutine() <= goroutines })
		})
	}
}

// An idle HTTP connection is parked in the epoll set,
// not turned into a net.Conn, until its client speaks.
func TestHandoffsParkIdleHTTP(t *testing.T) {
	up, _ := fakeUpgrader(t)
	h := openHandoffs(t, KindHTTP)
	h.unparked.Store(0) // past the ones delivered unparked
	recv(t, up)         // ACCEPT
	sc, cc := testnet.TCPPair(t)
	if m := handOff(t, up, 1, KindHTTP, sc, handoff.Conn{}); m.Type != handoff.TypeAck {
		t.Fatalf("answer %+v, want ACK", m)
	}
	sc.Close()
	l := h.Listener(KindHTTP)
	parked := func() int {
		h.park.mu.Lock()
		defer h.park.mu.Unlock()
		return len(h.park.parked)
	}
	waitFor(t, "the connection parked", func() bool { return parked() == 1 })
	l.mu.Lock()
	queued := len(l.queue)
	l.mu.Unlock()
	if queued != 0 || l.Pending() != 1 {
		t.Fatalf("parked connection: queued %d, pending %d; want 0 queued (not delivered yet), 1 pending", queued, l.Pending())
	}
	io.WriteString(cc, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	c := accept(t, l)
	defer c.Close()
	if parked() != 0 {
		t.Fatal("still parked after delivery")
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "GET " {
		t.Fatalf("read %q, %v", buf, err)
	}
}

// Sending. Send passes the fd with its state and waits
// for upgrader's answer: nil on ACK, an error with the reason on NAK.
func TestHandoffsSend(t *testing.T) {
	up, _ := fakeUpgrader(t)
	h := openHandoffs(t)
	recv(t, up) // ACCEPT
	sc, cc := testnet.TCPPair(t)
	for _, answer := range []string{handoff.TypeAck, handoff.TypeNak} {
		done := make(chan error, 1)
		go func() { done <- h.Send("counter", []Outgoing{{Conn: sc, State: []byte("9"), Buffered: []byte("x")}}) }()
		m, fds := recv(t, up)
		if m.Type != handoff.TypeHandoff || m.Kind != "counter" || len(fds) != 1 || string(m.Conns[0].State) != "9" || string(m.Conns[0].Buffered) != "x" {
			t.Fatalf("upgrader got %+v with %d fds", m, len(fds))
		}
		// The fd passed is the connection: what the client writes is read there.
		io.WriteString(cc, "z")
		b := make([]byte, 1)
		if n, err := unix.Read(fds[0], b); n != 1 || err != nil || b[0] != 'z' {
			t.Fatalf("read on the passed fd: %d %v", n, err)
		}
		handoff.CloseFDs(fds)
		up.Send(handoff.Message{Type: answer, ID: m.ID, Reason: "full"}, nil)
		err := <-done
		if answer == handoff.TypeAck && err != nil {
			t.Fatalf("Send after ACK: %v", err)
		}
		if answer == handoff.TypeNak && (err == nil || !strings.Contains(err.Error(), "full")) {
			t.Fatalf("Send after NAK: %v, want the reason", err)
		}
	}
}

// Send passes the connections' own fds, a full batch
// of 253 in order, and opens no fd of its own; a batch holding a closed
// connection fails before anything is sent, and the others stay usable.
func TestHandoffsSendPassesOwnFDs(t *testing.T) {
	up, _ := fakeUpgrader(t)
	h := openHandoffs(t)
	recv(t, up) // ACCEPT
	ino := func(fd int) uint64 {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			t.Fatal(err)
		}
		return st.Ino
	}
	out := make([]Outgoing, handoff.MaxFDs)
	want := make([]uint64, len(out))
	for i := range out {
		sc, _ := testnet.TCPPair(t)
		out[i] = Outgoing{Conn: sc}
		rc, _ := sc.SyscallConn()
		rc.Control(func(fd uintptr) { want[i] = ino(int(fd)) })
	}
	before := len(openFDs(t))
	done := make(chan error, 1)
	go func() { done <- h.Send("http", out) }()
	m, fds := recv(t, up)
	if len(fds) != len(out) {
		t.Fatalf("got %d fds, want %d", len(fds), len(out))
	}
	for i, fd := range fds {
		if ino(fd) != want[i] {
			t.Fatalf("fd %d of the batch is not connection %d", i, i)
		}
	}
	if n := len(openFDs(t)) - len(fds); n != before {
		t.Errorf("%d fds open while sending, %d before: Send opened its own", n, before)
	}
	handoff.CloseFDs(fds)
	up.Send(handoff.Message{Type: handoff.TypeAck, ID: m.ID}, nil)
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	out[len(out)-1].Conn.Close()
	if err := h.Send("http", out); err == nil {
		t.Fatal("Send with a closed connection: nil error")
	}
	// Nothing went out for it: the next message upgrader sees is the next
	// Send's.
	go func() { done <- h.Send("http", out[:1]) }()
	m, fds = recv(t, up)
	if len(fds) != 1 || ino(fds[0]) != want[0] {
		t.Fatalf("after the failed Send, upgrader got %+v with %d fds", m, len(fds))
	}
	handoff.CloseFDs(fds)
	up.Send(handoff.Message{Type: handoff.TypeAck, ID: m.ID}, nil)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// Close ends the goroutines and closes the socket and
// epoll instance; a connection parked at that moment still comes out of
// Accept (it was acknowledged), then Accept reports the listener closed.
func TestHandoffsCloseReleases(t *testing.T) {
	up, _ := fakeUpgrader(t)
	sc, cc := testnet.TCPPair(t)
	fdsBefore := openFDs(t)
	goroutines := runtime.NumGoroutine()

	s, err := New()
	if err != nil {
		t.Fatal(err)
	}
	h, err := s.Handoffs(KindHTTP)
	if err != nil {
		t.Fatal(err)
	}
	h.unparked.Store(0) // past the ones delivered unparked
	recv(t, up)         // ACCEPT
	if m := handOff(t, up, 1, KindHTTP, sc, handoff.Conn{}); m.Type != handoff.TypeAck {
		t.Fatalf("answer %+v, want ACK", m)
	}
	waitFor(t, "the connection parked", func() bool {
		h.park.mu.Lock()
		defer h.park.mu.Unlock()
		return len(h.park.parked) == 1
	})
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	h.Close() // twice is fine
	l := h.Listener(KindHTTP)
	c := accept(t, l)
	io.WriteString(cc, "x")
	if b := make([]byte, 1); func() error { _, err := io.ReadFull(c, b); return err }() != nil {
		t.Fatal("the connection parked at Close does not work")
	}
	c.Close()
	if _, err := l.Accept(); err == nil {
		t.Fatal("Accept after Close and the last connection: no error")
	}
	if err := h.Send("x", nil); err != ErrNoHandoff {
		t.Fatalf("Send after Close: %v, want ErrNoHandoff", err)
	}
	after := openFDs(t)
	for fd, what := range after {
		if fdsBefore[fd] != what {
			t.Errorf("fd %d (%s) still open after Close", fd, what)
		}
	}
	waitFor(t, "the goroutines gone", func() bool { return runtime.NumGoroutine() <= goroutines })
	// upgrader's end sees the channel closed.
	if _, _, err := up.Recv(); err != handoff.ErrClosed {
		t.Fatalf("upgrader's end after Close: %v, want ErrClosed", err)
	}
}

// Reports go to the caller's logger, never to stderr.
func TestHandoffsLogToTheLogger(t *testing.T) {
	up, _, raw := fakeUpgraderRaw(t)
	defer unix.Close(raw)
	// Catch fd 2 for the test's length: the old code wrote there.
	saved, err := unix.Dup(2)
	if err != nil {
		t.Fatal(err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	unix.Dup2(int(w.Fd()), 2)
	w.Close()
	restore := sync.OnceFunc(func() { unix.Dup2(saved, 2); unix.Close(saved) })
	defer restore()

	rec := slogrec.New()
	s, err := New(WithLogger(rec.Logger()))
	if err != nil {
		t.Fatal(err)
	}
	h, err := s.Handoffs(KindHTTP)
	if err != nil {
		t.Fatal(err)
	}
	recv(t, up) // ACCEPT
	// A malformed message: dropped, reported, and the channel goes on.
	if err := unix.Sendmsg(raw, []byte("UPGRADER/1 BOGUS\n"), nil, nil, 0); err != nil {
		t.Fatal(err)
	}
	// The report is the record carrying handoff.ErrMalformed, at WARN.
	report, ok := rec.Wait(10*time.Second, func(r slogrec.Record) bool {
		err, _ := r.Attrs["error"].Any().(error)
		return errors.Is(err, handoff.ErrMalformed)
	})
	if !ok {
		t.Fatalf("no record carries handoff.ErrMalformed: %+v", rec.Records())
	}
	sc, _ := testnet.TCPPair(t)
	if m := handOff(t, up, 2, KindHTTP, sc, handoff.Conn{State: []byte("a")}); m.Type != handoff.TypeAck {
		t.Fatalf("the channel stopped after a malformed message: %+v", m)
	}
	h.Close()
	// Taken, so that no finalizer closes it during a later test.
	accept(t, h.Listener(KindHTTP)).Close()
	restore()
	var stderr bytes.Buffer
	r.SetReadDeadline(time.Now().Add(100 * time.Millisecond)) // the write end is closed by restore: EOF comes at once
	io.Copy(&stderr, r)
	r.Close()
	if stderr.Len() != 0 {
		t.Fatalf("wrote to stderr: %q", stderr.String())
	}
	if report.Level != slog.LevelWarn {
		t.Fatalf("the malformed message reported at %v, want WARN: %+v", report.Level, report)
	}
}

// A worker that takes handoffs grows its fd table ahead
// of the fds it receives (each growth inside recvmsg would stall the
// channel for an RCU grace period): room for a few batches at once, and
// more as batches fill it.
func TestHandoffsReserveFDTableAhead(t *testing.T) {
	size := func() int {
		b, err := os.ReadFile("/proc/self/status")
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "FDSize:"); ok {
				n, _ := strconv.Atoi(strings.TrimSpace(v))
				return n
			}
		}
		t.Fatal("no FDSize in /proc/self/status")
		return 0
	}
	up, _ := fakeUpgrader(t)
	h := openHandoffs(t, KindHTTP)
	recv(t, up) // ACCEPT
	waitFor(t, "an fd table of 1024", func() bool { return size() >= minFDTable })
	// A batch whose fds reach past half the table grows it further.
	var fds []int
	for len(fds) == 0 || fds[len(fds)-1] < size()/2 {
		fd, err := unix.Dup(0)
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, fd)
	}
	defer handoff.CloseFDs(fds)
	h.reserveFDs(fds[len(fds)-1])
	// Past twice the highest fd, or to RLIMIT_NOFILE, which a run before
	// this one (-count) may have reached already.
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	want := int(min(uint64(2*fds[len(fds)-1]+1), rl.Cur))
	waitFor(t, "the fd table to grow past the fds received", func() bool { return size() >= want })
}

// openHandoffs reads the environment (New) and opens the handoff channel
// for kinds, closed when the test ends.
func openHandoffs(t *testing.T, kinds ...string) *Handoffs {
	t.Helper()
	s, err := New()
	if err != nil {
		t.Fatal(err)
	}
	h, err := s.Handoffs(kinds...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// An answer that reached the sender's socket before its deadline counts
// even when the sender's reader gets to it after the deadline (stalled
// here by a hook; in life a stopped process, a long pause): the target
// owns the connections from its ACK. With no answer at all, Send times
// out.
func TestAnswerReadLateStillCounts(t *testing.T) {
	up, sb := channelEnds(t)
	const timeout = 100 * time.Millisecond
	var stall atomic.Bool
	atGate, release := make(chan struct{}), make(chan struct{})
	hold := func() {
		if stall.Load() {
			atGate <- struct{}{}
			<-release
		}
	}
	h := pastAccept(t, up, sb, nil, knobs{late: lateHandoff, sendTimeout: timeout, beforeRecv: hold})
	var once sync.Once
	unhold := func() { once.Do(func() { close(release) }) }
	defer h.Close()
	defer unhold() // first, or Close would wait for the held reader
	// One message it ignores takes the reader round to the hook, where
	// it stops.
	stall.Store(true)
	if err := up.Send(handoff.Message{Type: handoff.TypeNak, ID: 999, Reason: "unknown"}, nil); err != nil {
		t.Fatal(err)
	}
	<-atGate
	stall.Store(false)
	sc, _ := testnet.TCPPair(t)
	sent := make(chan error, 1)
	go func() { sent <- h.Send(KindHTTP, []Outgoing{{Conn: sc}}) }()
	m, fds := recv(t, up)
	handoff.CloseFDs(fds)
	if m.Type != handoff.TypeHandoff {
		t.Fatalf("got %+v, want the HANDOFF", m)
	}
	if err := up.Send(handoff.Message{Type: handoff.TypeAck, ID: m.ID}, nil); err != nil {
		t.Fatal(err)
	}
	// The ACK waits in the socket while the deadline passes: Send must
	// not give up on it.
	select {
	case err := <-sent:
		t.Fatalf("Send returned %v while its ACK waited to be read", err)
	case <-time.After(3 * timeout):
	}
	unhold()
	select {
	case err := <-sent:
		if err != nil {
			t.Fatalf("Send: %v, want the ACK that came in time", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Send did not return once its ACK was read")
	}

	// No answer: a timeout, and the connection still the caller's.
	sc2, _ := testnet.TCPPair(t)
	go func() { sent <- h.Send(KindHTTP, []Outgoing{{Conn: sc2}}) }()
	m, fds = recv(t, up)
	handoff.CloseFDs(fds)
	select {
	case err := <-sent:
		if err == nil || !strings.Contains(err.Error(), "no answer") {
			t.Fatalf("Send: %v, want a timeout", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Send with no answer did not time out")
	}
	// An answer after that finds no Send to end; the channel goes on.
	if err := up.Send(handoff.Message{Type: handoff.TypeAck, ID: m.ID}, nil); err != nil {
		t.Fatal(err)
	}
	sc3, _ := testnet.TCPPair(t)
	go func() { sent <- h.Send(KindHTTP, []Outgoing{{Conn: sc3}}) }()
	m, fds = recv(t, up)
	handoff.CloseFDs(fds)
	up.Send(handoff.Message{Type: handoff.TypeNak, ID: m.ID, Reason: "test"}, nil)
	if err := <-sent; err == nil || !strings.Contains(err.Error(), "refused: test") {
		t.Fatalf("Send: %v, want the NAK", err)
	}
}

// A Send's deadline starts once its sendmsg has returned: one that blocks
// (upgrader's socket full) past sendTimeout is not timed out while its
// batch is still on its way, to reach upgrader, be ACKed at once, and
// leave both processes serving the connection.
func TestSendDeadlineStartsOnceSent(t *testing.T) {
	up, sb := channelEnds(t)
	const timeout = 100 * time.Millisecond
	h := pastAccept(t, up, sb, nil, knobs{late: lateHandoff, sendTimeout: timeout})
	// Fill upgrader's receive queue from the worker's end.
	fd, err := h.sock.DupFD()
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	filler, _ := handoff.Encode(handoff.Message{Type: handoff.TypeAccept, Kinds: []string{"x"}})
	n := 0
	for {
		if err := unix.Sendmsg(fd, filler, nil, nil, unix.MSG_DONTWAIT); err != nil {
			if !errors.Is(err, unix.EAGAIN) {
				t.Fatal(err)
			}
			break
		}
		n++
	}
	t.Logf("queued %d fillers", n)
	sc, _ := testnet.TCPPair(t)
	sent := make(chan error, 1)
	go func() { sent <- h.Send(KindHTTP, []Outgoing{{Conn: sc}}) }()
	time.Sleep(3 * timeout) // the stimulus: upgrader slow to read, its loop busy
	// upgrader reads on, and ACKs the batch the moment it comes.
	for {
		m, fds := recv(t, up)
		handoff.CloseFDs(fds)
		if m.Type == handoff.TypeHandoff {
			if !m.Arrived.IsZero() {
				t.Logf("batch arrived %v ago", time.Since(m.Arrived))
			}
			if err := up.Send(handoff.Message{Type: handoff.TypeAck, ID: m.ID}, nil); err != nil {
				t.Fatal(err)
			}
			break
		}
	}
	if err := <-sent; err != nil {
		t.Fatalf("Send: %v, though its batch reached upgrader only now and was ACKed at once: the caller keeps serving a connection upgrader handed on", err)
	}
}

// pastAccept starts the worker's end of a channel on sb with k, taking
// kinds, and reads its ACCEPT at up; it is closed when the test ends.
func pastAccept(t *testing.T, up, sb *handoff.Socket, kinds []string, k knobs) *Handoffs {
	t.Helper()
	h, err := startHandoffs(sb, kinds, slog.New(slog.DiscardHandler), k)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	if m, _ := recv(t, up); m.Type != handoff.TypeAccept {
		t.Fatalf("first message %+v, want ACCEPT", m)
	}
	return h
}

// channelEnds returns a new channel's two ends: upgrader's, closed at the
// test's end, and the worker's, for startHandoffs to take over.
func channelEnds(t *testing.T) (up, worker *handoff.Socket) {
	t.Helper()
	a, b, err := handoff.Pair()
	if err != nil {
		t.Fatal(err)
	}
	if up, err = handoff.NewSocket(a); err != nil {
		b.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { up.Close() })
	if worker, err = handoff.NewSocket(b); err != nil {
		t.Fatal(err)
	}
	return up, worker
}

// A channel that ends after a HANDOFF went out and before its answer
// (upgrader gone: it may have forwarded the batch) fails the Send with
// ErrUnanswered, and Handoff closes its connection; a Send that finds the
// channel gone sends nothing and fails with ErrNoHandoff.
func TestSendUnansweredWhenChannelEnds(t *testing.T) {
	for _, end := range []string{"upgrader closes", "the worker closes"} {
		t.Run(end, func(t *testing.T) {
			up, sb := channelEnds(t)
			h := pastAccept(t, up, sb, nil, knobs{late: lateHandoff, sendTimeout: SendTimeout})
			sc, cc := testnet.TCPPair(t)
			sent := make(chan error, 1)
			go func() { sent <- h.Handoff(sc, "app", nil, nil) }()
			m, fds := recv(t, up)
			if m.Type != handoff.TypeHandoff || len(fds) != 1 {
				t.Fatalf("got %+v with %d fds, want a HANDOFF of one", m, len(fds))
			}
			// The taker's copy: the connection lives on in it.
			taker := os.NewFile(uintptr(fds[0]), "taker")
			defer taker.Close()
			if end == "upgrader closes" {
				up.Close()
			} else {
				go h.Close()
			}
			if err := within(t, sent, "Handoff, once the channel ended,"); !errors.Is(err, ErrUnanswered) {
				t.Fatalf("Handoff: %v, want ErrUnanswered", err)
			}
			if _, err := sc.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
				t.Fatalf("the sender's copy after ErrUnanswered: write %v, want it closed", err)
			}
			// Closed here, the connection is the taker's still.
			io.WriteString(cc, "y")
			b := make([]byte, 1)
			if n, err := taker.Read(b); n != 1 || b[0] != 'y' {
				t.Fatalf("the taker's copy read %q, %v; want the client's byte", b[:n], err)
			}
			<-h.done
			sc2, _ := testnet.TCPPair(t)
			if err := h.Send("app", []Outgoing{{Conn: sc2}}); err != ErrNoHandoff {
				t.Fatalf("Send once the channel has ended: %v, want ErrNoHandoff", err)
			}
		})
	}
}

// A taker whose own Close ends the channel between taking a batch and
// acknowledging it closes what it took: upgrader hears the channel end
// with no ACK and refuses the batch to its sender, which serves it on.
func TestTakerClosedBeforeItsAckLetsTheBatchGo(t *testing.T) {
	up, sb := channelEnds(t)
	atAck, release := make(chan struct{}), make(chan struct{})
	h := pastAccept(t, up, sb, []string{KindHTTP}, knobs{late: lateHandoff, sendTimeout: SendTimeout,
		beforeAck: func() { atAck <- struct{}{}; <-release }})
	sc, cc := testnet.TCPPair(t)
	sendHandoff(t, up, 1, KindHTTP, sc, handoff.Conn{Buffered: []byte("GET / HTTP/1.1\r\n\r\n")})
	sc.Close() // the sender's copy: only the taker's is left
	<-atAck
	h.closeOnce.Do(func() { h.sock.Close() }) // Close's first step, under the batch
	close(release)
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := up.Recv(); err != handoff.ErrClosed {
		t.Fatalf("upgrader's end: %v, want the channel's end and no ACK", err)
	}
	if c, err := h.Listener(KindHTTP).Accept(); err == nil {
		c.Close()
		t.Fatal("a connection whose ACK could not be sent came out of Accept")
	}
	cc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := cc.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("the client read %d bytes, %v; want EOF: no copy of its connection left", n, err)
	}
}

// upgrader goes away before a batch's deadline while the channel's reader
// is busy, and the reader gets to the socket only after the deadline: the
// hang-up waiting there counts as what it is, the channel's end with the
// batch unanswered (ErrUnanswered), not as a timeout that would have the
// sender serve connections the taker may own.
func TestHangUpReadLateIsNoTimeout(t *testing.T) {
	up, sb := channelEnds(t)
	const timeout = 100 * time.Millisecond
	var stall atomic.Bool
	atGate, release := make(chan struct{}), make(chan struct{})
	h := pastAccept(t, up, sb, nil, knobs{late: lateHandoff, sendTimeout: timeout,
		beforeRecv: func() {
			if stall.Swap(false) {
				atGate <- struct{}{}
				<-release
			}
		}})
	sc, _ := testnet.TCPPair(t)
	sent := make(chan error, 1)
	go func() { sent <- h.Send("app", []Outgoing{{Conn: sc}}) }()
	m, fds := recv(t, up)
	handoff.CloseFDs(fds)
	var due time.Time
	waitFor(t, "the batch's deadline set", func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		due = h.waiting[m.ID].deadline
		return !due.IsZero()
	})
	// An answer to no batch takes the reader round to the hook.
	stall.Store(true)
	if err := up.Send(handoff.Message{Type: handoff.TypeNak, ID: 999, Reason: "unknown"}, nil); err != nil {
		t.Fatal(err)
	}
	<-atGate
	up.Close()
	// The reader may look again only once the deadline has passed: that
	// is the case under test.
	time.Sleep(time.Until(due))
	close(release)
	if err := within(t, sent, "Send"); !errors.Is(err, ErrUnanswered) {
		t.Fatalf("Send: %v, want ErrUnanswered: the channel ended before the deadline", err)
	}
}

// within is what ch gives, failing the test when nothing comes in 10 s.
func within(t *testing.T, ch <-chan error, what string) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not return within 10s", what)
		return nil
	}
}
