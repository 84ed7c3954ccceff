package drain

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
	"github.com/seed6cb0314a/upgrader/internal/testnet"
)

// handoffServer runs Serve with a handoff channel to a fake upgrader on a
// real loopback listener. Every response carries X-From: old.
func handoffServer(t *testing.T, ack func() bool) (u *fakeUpgrader, d *Server, addr string, drain func() error) {
	t.Helper()
	u, h := newFakeUpgrader(t, ack, true)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("X-From", "old")
	})}
	d, addr, drain = startServe(t, srv, Options{Timeout: 20 * time.Second, Handoff: h})
	return u, d, addr, drain
}

// takerAnswers serves one request on a connection the fake upgrader took,
// as the new generation would, and says so in X-From.
// It runs on its own goroutine: the result comes on the channel.
func takerAnswers(t *testing.T, u *fakeUpgrader) <-chan error {
	t.Helper()
	res := make(chan error, 1)
	go func() {
		var c net.Conn
		select {
		case c = <-u.taken:
		case <-time.After(20 * time.Second):
			res <- errors.New("no connection was handed off")
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		req, err := http.ReadRequest(bufio.NewReader(c))
		if err != nil {
			res <- fmt.Errorf("the taker could not read a whole request on the handed-off connection: %v", err)
			return
		}
		body, _ := io.ReadAll(req.Body)
		if string(body) != "x" {
			res <- fmt.Errorf("taker got body %q, want %q", body, "x")
			return
		}
		_, err = io.WriteString(c, "HTTP/1.1 200 OK\r\nX-From: new\r\nContent-Length: 0\r\n\r\n")
		res <- err
	}()
	return res
}

func dialKeepAlive(t *testing.T, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, bufio.NewReader(c)
}

// An idle keep-alive connection goes to the new generation at the drain:
// its next request is read whole there, and the old worker's Serve returns
// with it counted as handed off.
func TestHandoffTakesIdleConnection(t *testing.T) {
	u, d, addr, drain := handoffServer(t, func() bool { return true })
	c, br := dialKeepAlive(t, addr)
	if resp := rawRequest(t, c, br, "/"); resp.Header.Get("X-From") != "old" || resp.Close {
		t.Fatalf("before the drain: X-From %q, close %v", resp.Header.Get("X-From"), resp.Close)
	}
	if err := drain(); err != nil {
		t.Fatal(err)
	}
	if n := d.HandedOff(); n != 1 {
		t.Fatalf("HandedOff %d, want 1", n)
	}
	taker := takerAnswers(t, u)
	resp := rawRequest(t, c, br, "/")
	if err := <-taker; err != nil {
		t.Fatal(err)
	}
	if resp.Header.Get("X-From") != "new" {
		t.Fatalf("request after the handoff answered by %q", resp.Header.Get("X-From"))
	}
}

// A connection accepted but silent so far (StateNew) is handed off too.
func TestHandoffTakesNewConnection(t *testing.T) {
	var states sync.Map
	u, h := newFakeUpgrader(t, func() bool { return true }, true)
	newSeen := make(chan struct{}, 1)
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Header().Set("X-From", "old") }),
		ConnState: func(c net.Conn, st http.ConnState) {
			states.Store(c, st)
			if st == http.StateNew {
				newSeen <- struct{}{}
			}
		},
	}
	d, addr, drain := startServe(t, srv, Options{Timeout: 20 * time.Second, Handoff: h})
	c, br := dialKeepAlive(t, addr)
	<-newSeen
	if err := drain(); err != nil {
		t.Fatal(err)
	}
	if d.HandedOff() != 1 {
		t.Fatalf("HandedOff %d, want 1", d.HandedOff())
	}
	taker := takerAnswers(t, u)
	if resp := rawRequest(t, c, br, "/"); resp.Header.Get("X-From") != "new" {
		t.Fatalf("answered by %q", resp.Header.Get("X-From"))
	}
	if err := <-taker; err != nil {
		t.Fatal(err)
	}
}

// A refused handoff (NAK) leaves the connection with the old worker, which
// answers its next request with Connection: close and then lets Serve
// return.
func TestRefusedHandoffIsServedHere(t *testing.T) {
	u, d, addr, drain := handoffServer(t, func() bool { return false })
	c, br := dialKeepAlive(t, addr)
	rawRequest(t, c, br, "/")
	drained := make(chan error, 1)
	go func() { drained <- drain() }()
	select {
	case <-u.batches:
	case <-time.After(20 * time.Second):
		t.Fatal("no handoff was attempted")
	}
	resp := rawRequest(t, c, br, "/")
	if resp.Header.Get("X-From") != "old" || !resp.Close {
		t.Fatalf("after a refused handoff: X-From %q, close %v; want old, close", resp.Header.Get("X-From"), resp.Close)
	}
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
	if d.HandedOff() != 0 {
		t.Fatalf("HandedOff %d after a NAK", d.HandedOff())
	}
}

// A connection whose handoff was refused and whose client then stays
// idle (a balancer's pooled connection during a stop, when no generation
// takes handoffs) is closed once idle for IdleGrace, as any idle
// connection that cannot go is: not left to net/http's own timeouts or to
// the drain's deadline.
func TestRefusedHandoffIdleConnectionClosedAfterGrace(t *testing.T) {
	u, h := newFakeUpgrader(t, func() bool { return false }, true)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
	})}
	_, addr, drain := startServe(t, srv, Options{Timeout: 60 * time.Second, IdleGrace: 200 * time.Millisecond, Handoff: h})
	c, br := dialKeepAlive(t, addr)
	rawRequest(t, c, br, "/")
	drained := make(chan error, 1)
	go func() { drained <- drain() }()
	select {
	case <-u.batches:
	case <-time.After(20 * time.Second):
		t.Fatal("no handoff was attempted")
	}
	c.SetReadDeadline(time.Now().Add(30 * time.Second)) // half the deadline
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("idle connection after a refused handoff: %v, want closed (EOF) after the grace", err)
	}
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
}

// Half a request already read by net/http when the drain begins: the
// connection is not taken (the bytes are in net/http's buffer); the request
// is finished and answered here, with "Connection: close", so that the
// connection leaves promptly all the same (one that cannot be taken gets
// Connection: close on its next response).
func TestHandoffLeavesHalfReadRequestHere(t *testing.T) {
	_, d, addr, drain := handoffServer(t, func() bool { return true })
	c, br := dialKeepAlive(t, addr)
	rawRequest(t, c, br, "/")
	half := "POST /half HTTP/1.1\r\nHost: x\r\n"
	if _, err := io.WriteString(c, half); err != nil {
		t.Fatal(err)
	}
	// Wait until net/http has read those bytes.
	waitFor(t, "net/http to read half a request", func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		for c := range d.conns {
			if hc, ok := c.(*hconn); ok {
				hc.mu.Lock()
				got := hc.delivered > hc.idleMark
				hc.mu.Unlock()
				if got {
					return true
				}
			}
		}
		return false
	})
	drained := make(chan error, 1)
	go func() { drained <- drain() }()
	waitFor(t, "the drain to begin", d.Draining)
	if _, err := io.WriteString(c, "Content-Length: 1\r\n\r\nx"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.Header.Get("X-From") != "old" || resp.StatusCode != 200 || !resp.Close {
		t.Fatalf("half-read request: %d from %q, close=%v; want 200 from old with Connection: close", resp.StatusCode, resp.Header.Get("X-From"), resp.Close)
	}
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
	if d.HandedOff() != 0 {
		t.Fatalf("HandedOff %d, want 0", d.HandedOff())
	}
	if n, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("after Connection: close: read %v, %v; want EOF", n, err)
	}
}

// waitFor polls cond, a state of the code under test that has no event.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond) // polling interval
	}
}

// recordingConn records net/http's use of a connection: the size of every
// Read, and whether it called Close; eof makes every later Read return
// errTakenOver, as hconn's takeover does.
type recordingConn struct {
	net.Conn
	mu     sync.Mutex
	reads  []int
	closed chan struct{}
	once   sync.Once
	eof    atomic.Bool
	wrote  atomic.Int64
}

func (c *recordingConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	c.reads = append(c.reads, len(p))
	c.mu.Unlock()
	if c.eof.Load() {
		return 0, errTakenOver
	}
	return c.Conn.Read(p)
}

func (c *recordingConn) Write(p []byte) (int, error) {
	c.wrote.Add(int64(len(p)))
	return c.Conn.Write(p)
}

func (c *recordingConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

func (c *recordingConn) readSizes() []int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]int(nil), c.reads...)
}

// oneConnListener accepts real loopback connections wrapped in
// recordingConns, then fails with errDone once closed.
type recordingListener struct {
	net.Listener
	conns chan *recordingConn
	eof   bool
}

func (l *recordingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	rc := &recordingConn{Conn: c, closed: make(chan struct{})}
	rc.eof.Store(l.eof)
	l.conns <- rc
	return rc, nil
}

// The takeover (handoff.go) rests on three behaviours of net/http that no
// API promises. Each is checked here directly, so that a Go release that
// changes one fails this test by name instead of silently losing
// handoffs, or connections.
func TestNetHTTPAssumptions(t *testing.T) {
	serve := func(t *testing.T, eof bool) (*recordingListener, string) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		rl := &recordingListener{Listener: l, conns: make(chan *recordingConn, 4), eof: eof}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {})}
		go srv.Serve(rl)
		t.Cleanup(func() { srv.Close() })
		return rl, l.Addr().String()
	}

	t.Run("reads a whole 4096-byte buffer only when it holds no byte", func(t *testing.T) {
		rl, addr := serve(t, false)
		c, br := dialKeepAlive(t, addr)
		rc := <-rl.conns
		// Reads into net/http's buffer, leaving out the 1-byte background
		// reads it makes while a handler runs.
		sized := func(n int) []int {
			var out []int
			waitFor(t, "net/http's next read", func() bool {
				out = out[:0]
				for _, s := range rc.readSizes() {
					if s != 1 {
						out = append(out, s)
					}
				}
				return len(out) >= n
			})
			return out
		}
		if got := sized(1)[0]; got != httpReadBuffer {
			t.Fatalf("net/http's first read on a new connection asks for %d bytes, drain assumes %d (httpReadBuffer): handoffs would never happen", got, httpReadBuffer)
		}
		rawRequest(t, c, br, "/")
		// Idle after a response (the first read got the request): the
		// pending read must again be a whole buffer.
		if got := sized(2)[1]; got != httpReadBuffer {
			t.Fatalf("net/http's read on an idle connection asks for %d bytes, drain assumes %d (httpReadBuffer): idle connections would never be handed off", got, httpReadBuffer)
		}
		// Holding bytes (a pipelined request's start), it must ask for
		// less: the signal that makes drain leave such a connection alone.
		// The idle read gets both; the next one, with "POST / HT" held, is
		// for the rest.
		c.Write([]byte("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nxPOST / HT"))
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if got := sized(3); got[2] >= httpReadBuffer {
			t.Fatalf("holding 9 bytes of a request, net/http asked for %d bytes (reads %v), drain assumes less than %d: it would take a connection with a request in net/http's buffer", got[2], got, httpReadBuffer)
		}
	})

	t.Run("drops a connection silently on EOF, and closes it", func(t *testing.T) {
		for _, when := range []string{"new", "idle"} {
			rl, addr := serve(t, when == "new")
			c, br := dialKeepAlive(t, addr)
			rc := <-rl.conns
			if when == "idle" {
				rawRequest(t, c, br, "/")
				rc.wrote.Store(0)
				rc.eof.Store(true)
				// Wake the pending idle read, as the takeover does.
				rc.Conn.SetReadDeadline(time.Unix(1, 0))
			}
			select {
			case <-rc.closed:
			case <-time.After(10 * time.Second):
				t.Fatalf("%s connection: net/http did not call Close after its read got errTakenOver (%v): a taken connection would never be handed off", when, errTakenOver)
			}
			if w := rc.wrote.Load(); w != 0 {
				t.Fatalf("%s connection: net/http wrote %d bytes after its read got errTakenOver (%v): the client would see them, and the taker's answer after them", when, w, errTakenOver)
			}
		}
	})

	t.Run("registers a connection (StateNew) before Serve returns", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		var registered atomic.Bool
		srv := &http.Server{ConnState: func(c net.Conn, st http.ConnState) {
			if st == http.StateNew {
				registered.Store(true)
			}
		}}
		defer srv.Close()
		dl := &failAfterOne{Listener: l}
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := srv.Serve(dl); !errors.Is(err, errListenerDone) {
			t.Fatalf("Serve: %v", err)
		}
		if !registered.Load() {
			t.Fatal("net/http's Serve returned before ConnState(StateNew) for a connection it accepted: the drain could miss it and exit with it")
		}
	})
}

var errListenerDone = errors.New("listener done")

// failAfterOne accepts one connection, then fails.
type failAfterOne struct {
	net.Listener
	n int
}

func (l *failAfterOne) Accept() (net.Conn, error) {
	if l.n++; l.n > 1 {
		return nil, errListenerDone
	}
	return l.Listener.Accept()
}

// idleConns opens n keep-alive connections to addr, each idle after one
// request.
func idleConns(t *testing.T, addr string, n int) ([]net.Conn, []*bufio.Reader) {
	t.Helper()
	cs := make([]net.Conn, n)
	brs := make([]*bufio.Reader, n)
	for i := range cs {
		cs[i], brs[i] = dialKeepAlive(t, addr)
		rawRequest(t, cs[i], brs[i], "/")
	}
	return cs, brs
}

// Batches awaiting an answer are bounded (upgrader
// refuses a batch beyond its 4-deep queue for a target, and each batch
// in flight holds the target's fds): a slow answerer sees at most
// maxInFlight unanswered, and every connection is handed off all the same.
func TestHandoffBoundsBatchesInFlight(t *testing.T) {
	const n = 5*handoff.MaxFDs + 10 // more than maxInFlight full batches
	sock, h := handoffChannel(t)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
	})}
	d, addr, drain := startServe(t, srv, Options{Timeout: 20 * time.Second, Handoff: h})
	idleConns(t, addr, n)

	// The answerer lets batches pile up: it answers the oldest only once
	// no other has come for 50 ms, so an unbounded sender would have all
	// its full batches unanswered at once.
	msgs := make(chan handoff.Message)
	go func() {
		for {
			m, fds, err := sock.Recv()
			handoff.CloseFDs(fds)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- m
		}
	}()
	var maxUnanswered, batches int
	answered := make(chan struct{})
	go func() {
		defer close(answered)
		var unanswered []uint64
		for {
			select {
			case m, ok := <-msgs:
				if !ok {
					return
				}
				batches++
				unanswered = append(unanswered, m.ID)
				maxUnanswered = max(maxUnanswered, len(unanswered))
			case <-time.After(50 * time.Millisecond):
				if len(unanswered) > 0 {
					sock.Send(handoff.Message{Type: handoff.TypeAck, ID: unanswered[0]}, nil)
					unanswered = unanswered[1:]
				}
			}
		}
	}()
	if err := drain(); err != nil {
		t.Fatal(err)
	}
	if got := d.HandedOff(); got != n {
		t.Fatalf("handed off %d of %d", got, n)
	}
	sock.Close()
	<-answered
	const outbox = 4 // upgrader's queue of batches for one target
	if maxUnanswered > outbox || batches < n/handoff.MaxFDs {
		t.Fatalf("%d batches, up to %d unanswered at once; want at most %d", batches, maxUnanswered, outbox)
	}
}

// A refusal also refuses the connections taken but not sent yet: they are
// all served here (answered with Connection: close), none is lost, and the
// drain ends once they are closed.
func TestRefusedHandoffServesQueuedConnectionsHere(t *testing.T) {
	const n = 3 * handoff.MaxFDs
	u, d, addr, drain := handoffServer(t, func() bool { return false })
	cs, brs := idleConns(t, addr, n)
	servedHereAfterRefusal(t, u, d, drain, cs, brs)
}

// servedHereAfterRefusal drains d, whose fake upgrader refuses every
// batch, and checks that every one of cs is then served here, answered
// with Connection: close, that none was handed off, and that the drain
// ends once they are closed.
func servedHereAfterRefusal(t *testing.T, u *fakeUpgrader, d *Server, drain func() error, cs []net.Conn, brs []*bufio.Reader) {
	t.Helper()
	drained := make(chan error, 1)
	go func() { drained <- drain() }()
	select {
	case <-u.batches:
	case <-time.After(20 * time.Second):
		t.Fatal("no handoff was attempted")
	}
	// The batch reached the fake upgrader, which refuses it; until the
	// drain has taken the refusal, a request would rightly be answered
	// without "Connection: close" (its connection could still go). Polling
	// the drain's own state: no event marks the moment.
	for deadline := time.Now().Add(20 * time.Second); d.handoffOn.Load(); {
		if time.Now().After(deadline) {
			t.Fatal("the refusal was never taken")
		}
		time.Sleep(time.Millisecond) // polling interval
	}
	for i := range cs {
		resp := rawRequest(t, cs[i], brs[i], "/")
		if resp.Header.Get("X-From") != "old" || !resp.Close {
			t.Fatalf("connection %d after a refused handoff: X-From %q, close %v; want old, close", i, resp.Header.Get("X-From"), resp.Close)
		}
	}
	select {
	case err := <-drained:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the drain did not end once every connection was closed")
	}
	if d.HandedOff() != 0 {
		t.Fatalf("HandedOff %d after a NAK", d.HandedOff())
	}
}

// A partial batch goes at once while the channel is idle, and waits for
// its window while another batch is in flight (autocorking): a
// connection in transit cannot be answered, so none may wait for nothing.
func TestPartialBatchGoesAtOnceWhenNoneInFlight(t *testing.T) {
	s := &Server{}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.windowArmed = true // as takenConn leaves it; no timer runs here
	s.queue = []*hconn{{}, {}}
	if b := s.nextBatchLocked(); len(b) != 2 || s.inFlight != 1 || len(s.queue) != 0 {
		t.Fatalf("idle channel: batch of %d, %d in flight, %d queued; want 2, 1, 0", len(b), s.inFlight, len(s.queue))
	}
	s.queue = []*hconn{{}}
	if b := s.nextBatchLocked(); b != nil {
		t.Fatalf("a batch in flight, window open: sent %d; want the connection kept for the window", len(b))
	}
	s.windowDue = true
	if b := s.nextBatchLocked(); len(b) != 1 || s.inFlight != 2 {
		t.Fatalf("window passed: batch of %d, %d in flight; want 1, 2", len(b), s.inFlight)
	}
}

// Kicks are paced: at no batch are more than kickAhead connections between
// their kick and their batch's answer, and every idle connection is handed
// off all the same, those kicked last included.
func TestHandoffPacesKicks(t *testing.T) {
	const n = kickAhead + 2*handoff.MaxFDs + 7
	var srvp atomic.Pointer[Server]
	var mu sync.Mutex
	most, batches := 0, 0
	_, h := newFakeUpgrader(t, func() bool {
		if d := srvp.Load(); d != nil {
			d.mu.Lock()
			under := d.kicked + d.pendingHO
			d.mu.Unlock()
			mu.Lock()
			most, batches = max(most, under), batches+1
			mu.Unlock()
		}
		return true
	}, false)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {})}
	d, addr, drain := startServe(t, srv, Options{Timeout: 20 * time.Second, Handoff: h})
	srvp.Store(d)
	idleConns(t, addr, n)
	if err := drain(); err != nil {
		t.Fatal(err)
	}
	if got := d.HandedOff(); got != n {
		t.Fatalf("handed off %d of %d", got, n)
	}
	mu.Lock()
	defer mu.Unlock()
	if most > kickAhead || batches < n/handoff.MaxFDs {
		t.Fatalf("%d batches, up to %d connections kicked and unanswered at once; want at most %d", batches, most, kickAhead)
	}
}

// A refusal reaches the idle connections not kicked yet too: every one is
// served here, answered with Connection: close, and the drain ends.
func TestRefusedHandoffServesConnectionsNotKickedYet(t *testing.T) {
	const n = kickAhead + handoff.MaxFDs
	u, h := newFakeUpgrader(t, func() bool { return false }, false)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("X-From", "old")
	})}
	// A long grace: what is idle here after the refusal is not closed
	// under the requests below.
	d, addr, drain := startServe(t, srv, Options{Timeout: 30 * time.Second, IdleGrace: time.Minute, Handoff: h})
	cs, brs := idleConns(t, addr, n)
	servedHereAfterRefusal(t, u, d, drain, cs, brs)
}

// Our copies of handed-off connections are closed once the handoff is
// over, even while the drain goes on (a request still in flight): a client
// whose connection the taker closes sees the close, which it would not
// while a copy stayed open here.
func TestHandedOffCopiesClosedWhileDrainGoesOn(t *testing.T) {
	const n = 2*handoff.MaxFDs + 3
	u, h := newFakeUpgrader(t, func() bool { return true }, true)
	release := make(chan struct{})
	entered := make(chan struct{}, 1)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			entered <- struct{}{}
			<-release
		}
	})}
	d, addr, drain := startServe(t, srv, Options{Timeout: 30 * time.Second, Handoff: h})
	cs, brs := idleConns(t, addr, n)
	slow, _ := dialKeepAlive(t, addr)
	if _, err := io.WriteString(slow, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	<-entered
	drained := make(chan error, 1)
	go func() { drained <- drain() }()
	defer close(release)
	for i := 0; i < n; i++ {
		select {
		case c := <-u.taken:
			c.Close() // the taker closes at once
		case <-time.After(20 * time.Second):
			t.Fatalf("%d of %d connections taken", i, n)
		}
	}
	for i, c := range cs {
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		if _, err := brs[i].ReadByte(); err != io.EOF {
			t.Fatalf("connection %d, closed by the taker: read %v; want EOF (a copy stayed open here)", i, err)
		}
	}
	select {
	case err := <-drained:
		t.Fatalf("the drain ended (%v) with a request in flight", err)
	default:
	}
	if got := d.HandedOff(); got != n {
		t.Fatalf("handed off %d of %d", got, n)
	}
}

// The handoff may end when kickMore's last kicks all miss (the
// connections turned busy meanwhile), while the last batch's answer came
// in between: our copy of that batch is closed all the same, not left open
// until the drain returns.
func TestCopiesClosedWhenTheLastKicksMiss(t *testing.T) {
	s := New(&http.Server{}, Options{})
	s.handoffOn.Store(true)
	ours, client := net.Pipe()
	defer client.Close()
	copyConn := &hconn{Conn: ours, s: s, info: new(connInfo)} // handed off
	b1, b2 := net.Pipe()
	defer b1.Close()
	defer b2.Close()
	busy := &hconn{Conn: b1, s: s, info: new(connInfo)} // not idle: its kick misses
	s.pendingHO = 1                                     // the last batch, in flight
	s.toKick = []*hconn{busy}
	busy.mu.Lock() // hold kickMore inside kick(), after s.kicked += 1
	done := make(chan struct{})
	go func() { s.kickMore(); close(done) }()
	for {
		s.mu.Lock()
		k := s.kicked
		s.mu.Unlock()
		if k == 1 {
			break
		}
		time.Sleep(time.Millisecond) // polling interval
	}
	// sendBatch's success path for the last batch.
	s.mu.Lock()
	s.pendingHO--
	s.handedOff++
	s.mu.Unlock()
	s.closeCopies([]*hconn{copyConn})
	busy.mu.Unlock()
	<-done
	s.closing.Wait()
	s.mu.Lock()
	over := s.kicked == 0 && len(s.toKick) == 0 && s.pendingHO == 0
	s.mu.Unlock()
	client.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	_, err := client.Read(make([]byte, 1))
	if over && err != io.EOF {
		s.closeMu.Lock()
		n, on := len(s.toClose), s.closerOn
		s.closeMu.Unlock()
		t.Fatalf("handoff over (kicked 0, toKick empty, pendingHO 0) but our copy is still open: read %v; toClose %d, closerOn %v", err, n, on)
	}
}

// A connection offered once (its batch refused, given back) is never
// kicked for a handoff again, even from a kick queued before the refusal:
// its Close would neither queue nor close it, net/http would drop it, and
// its kick would stay counted.
func TestOfferedConnectionIsNotKickedAgain(t *testing.T) {
	s := New(&http.Server{}, Options{})
	s.handoffOn.Store(true) // as kickMore saw it before the refusal
	ours, client := net.Pipe()
	defer client.Close()
	c := &hconn{Conn: ours, s: s, info: new(connInfo)}
	c.info.http1.Store(true)
	c.offered = true      // refused once, reset by giveBack
	c.setIdle(true, true) // giveBack's track(StateNew)
	s.toKick = []*hconn{c}
	s.kickMore()
	s.mu.Lock()
	k := s.kicked
	s.mu.Unlock()
	c.mu.Lock()
	want := c.want
	c.mu.Unlock()
	if k != 0 || want {
		t.Fatalf("an offered connection was kicked again: s.kicked=%d, want=%v; want 0, false", k, want)
	}
}

// A request the client sends while its idle connection is on its way to
// the new generation (taken where net/http's read waits, the batch not yet
// answered) is not read here: acknowledged, the taker reads it whole; refused,
// the old worker, whose read was woken by those bytes while the connection
// was not its own, answers it all the same.
func TestRequestWhileHandoffAwaitsAnswer(t *testing.T) {
	for _, ack := range []bool{true, false} {
		t.Run(map[bool]string{true: "ack", false: "nak"}[ack], func(t *testing.T) {
			sock, h := handoffChannel(t)
			srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.Copy(io.Discard, r.Body)
				w.Header().Set("X-From", "old")
			})}
			// No idle close after a refusal (IdleGrace < 0): only the
			// drain's wake-up may get the request read.
			d, addr, drain := startServe(t, srv, Options{Timeout: 20 * time.Second, IdleGrace: -1, Handoff: h})
			woken := make(chan struct{}, 1)
			d.testInPlaceWoken = func() {
				select {
				case woken <- struct{}{}:
				default:
				}
			}
			c, br := dialKeepAlive(t, addr)
			rawRequest(t, c, br, "/")
			waitFor(t, "net/http's read for the next request waiting for the socket", func() bool {
				d.mu.Lock()
				var hcs []*hconn
				for c := range d.conns {
					if hc, ok := c.(*hconn); ok {
						hcs = append(hcs, hc)
					}
				}
				d.mu.Unlock()
				for _, hc := range hcs {
					hc.mu.Lock()
					w := hc.waiting
					hc.mu.Unlock()
					if w == httpReadBuffer {
						return true
					}
				}
				return false
			})
			drained := make(chan error, 1)
			go func() { drained <- drain() }()
			m, fds, err := sock.Recv()
			if err != nil || m.Type != handoff.TypeHandoff || len(fds) != 1 {
				t.Fatalf("got %+v with %d fds, %v: want a HANDOFF of the one connection", m, len(fds), err)
			}
			const req = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx"
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.WriteString(c, req); err != nil {
				t.Fatal(err)
			}
			// The old worker's read, taken where it waited, woken by the
			// request and leaving it in the socket's queue, which both
			// workers' copies share, before the answer goes.
			select {
			case <-woken:
			case <-time.After(10 * time.Second):
				t.Fatal("the request never woke the old worker's read, taken in place")
			}
			if n, err := unix.IoctlGetInt(fds[0], unix.SIOCINQ); err != nil || n != len(req) {
				t.Fatalf("%d bytes queued (%v), want the whole request's %d", n, err, len(req))
			}
			if !ack {
				handoff.CloseFDs(fds)
				if err := sock.Send(handoff.Message{Type: handoff.TypeNak, ID: m.ID, Reason: "test refuses"}, nil); err != nil {
					t.Fatal(err)
				}
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatalf("the request sent while its handoff awaited a NAK: %v", err)
				}
				if resp.Header.Get("X-From") != "old" || !resp.Close {
					t.Fatalf("after the NAK: X-From %q, close %v; want old, close", resp.Header.Get("X-From"), resp.Close)
				}
				if err := <-drained; err != nil {
					t.Fatal(err)
				}
				return
			}
			if err := sock.Send(handoff.Message{Type: handoff.TypeAck, ID: m.ID}, nil); err != nil {
				t.Fatal(err)
			}
			f := os.NewFile(uintptr(fds[0]), "taken")
			tc, err := net.FileConn(f)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			defer tc.Close()
			tc.SetDeadline(time.Now().Add(10 * time.Second))
			r, err := http.ReadRequest(bufio.NewReader(tc))
			if err != nil {
				t.Fatalf("the taker could not read the request sent while the handoff awaited its answer: %v", err)
			}
			if body, _ := io.ReadAll(r.Body); string(body) != "x" {
				t.Fatalf("taker got body %q, want %q", body, "x")
			}
			io.WriteString(tc, "HTTP/1.1 200 OK\r\nX-From: new\r\nContent-Length: 0\r\n\r\n")
			if resp, err := http.ReadResponse(br, nil); err != nil || resp.Header.Get("X-From") != "new" {
				t.Fatalf("answered by %v, %v; want the taker", resp, err)
			}
			if err := <-drained; err != nil {
				t.Fatal(err)
			}
			if d.HandedOff() != 1 {
				t.Fatalf("HandedOff %d, want 1", d.HandedOff())
			}
		})
	}
}

// A refusal gives a connection taken in place back to its waiting read and
// wakes it with a deadline in the past (giveBack). The bytes the client
// sent meanwhile are served, however the read wakes: by the bytes first
// (then net/http's own deadline must rule its next reads again), or by a
// deadline of net/http's that expired while the connection was taken
// (then the bytes are read all the same, not dropped with a timeout).
func TestRefusalWakeUpKeepsBytes(t *testing.T) {
	const head, rest = "GET / HTTP/1.1\r\n", "Host: x\r\n\r\n"
	setup := func(t *testing.T) (*hconn, net.Conn) {
		ours, client := testnet.TCPPair(t)
		c := &hconn{Conn: ours, s: New(&http.Server{}, Options{}), info: new(connInfo), raw: socketRawConn(ours)}
		c.woken = true // as giveBack leaves it
		ours.SetReadDeadline(aLongTimeAgo)
		if _, err := io.WriteString(client, head); err != nil {
			t.Fatal(err)
		}
		fd := -1
		c.raw.Control(func(f uintptr) { fd = int(f) })
		waitFor(t, "the client's bytes queued", func() bool {
			n, err := unix.IoctlGetInt(fd, unix.SIOCINQ)
			return err == nil && n == len(head)
		})
		return c, client
	}
	t.Run("bytes first", func(t *testing.T) {
		c, client := setup(t)
		var n int
		var done bool
		c.mu.Lock()
		c.raw.Control(func(fd uintptr) { n, _, done = c.readLocked(fd, make([]byte, httpReadBuffer)) })
		woken := c.woken
		c.mu.Unlock()
		if !done || n != len(head) || woken {
			t.Fatalf("read %d bytes (done %v), woken %v; want %d, and the wake-up over", n, done, woken, len(head))
		}
		io.WriteString(client, rest)
		if n, err := c.Read(make([]byte, 100)); err != nil || n != len(rest) {
			t.Fatalf("net/http's next read: %d, %v; want %d bytes (no deadline of its own)", n, err, len(rest))
		}
	})
	t.Run("net/http's deadline expired", func(t *testing.T) {
		c, _ := setup(t)
		c.httpDeadline = time.Now().Add(-time.Second)
		if n, err := c.read(make([]byte, httpReadBuffer)); err != nil || n != len(head) {
			t.Fatalf("read: %d, %v; want the %d bytes queued", n, err, len(head))
		}
	})
}

// A channel that ends with a batch on its way (upgrader killed after it
// forwarded the batch, before it relayed the ACK) leaves the batch's
// connections to the taker: the old worker closes its copies at once and
// serves none, so a request on one is read and answered by the taker
// alone, and the drain does not wait for them.
func TestUnansweredHandoffIsLeftToTheTaker(t *testing.T) {
	sock, h := handoffChannel(t)
	taken := make(chan net.Conn, 1)
	go func() {
		m, fds, err := sock.Recv()
		if err != nil || m.Type != handoff.TypeHandoff || len(fds) != 1 {
			handoff.CloseFDs(fds)
			close(taken)
			return
		}
		f := os.NewFile(uintptr(fds[0]), "taken")
		c, err := net.FileConn(f)
		f.Close()
		sock.Close() // gone without an answer
		if err == nil {
			taken <- c
		}
		close(taken)
	}()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("X-From", "old")
	})}
	// An idle grace and a deadline longer than the test's bound: a
	// connection served on here would hold the drain past it.
	d, addr, drain := startServe(t, srv, Options{Timeout: 60 * time.Second, IdleGrace: 60 * time.Second, Handoff: h})
	c, br := dialKeepAlive(t, addr)
	if resp := rawRequest(t, c, br, "/"); resp.Header.Get("X-From") != "old" {
		t.Fatalf("before the drain: X-From %q", resp.Header.Get("X-From"))
	}
	drained := make(chan error, 1)
	go func() { drained <- drain() }()
	tc, ok := <-taken
	if !ok {
		t.Fatal("the fake upgrader got no HANDOFF of one connection")
	}
	defer tc.Close()
	select {
	case err := <-drained:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the drain still holds the connection whose handoff went unanswered")
	}
	if n := d.HandedOff(); n != 0 {
		t.Fatalf("HandedOff %d, want 0: no ACK came", n)
	}
	u := &fakeUpgrader{taken: make(chan net.Conn, 1)}
	u.taken <- tc
	taker := takerAnswers(t, u)
	resp := rawRequest(t, c, br, "/")
	if err := <-taker; err != nil {
		t.Fatal(err)
	}
	if resp.Header.Get("X-From") != "new" {
		t.Fatalf("request after the unanswered handoff answered by %q, want the taker", resp.Header.Get("X-From"))
	}
}
