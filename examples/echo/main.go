// Command echo is an example worker with live WebSocket sessions that
// survive upgrades: GET /ws upgrades to a WebSocket (github.com/gobwas/ws,
// which frames a plain net.Conn and keeps no state of its own between
// frames), and every text message is answered with "<generation>
// <message>". GET / says what it is.
//
// The drain does not cut a session. When it begins (drain.Started for a
// connection hijacked from a handler, (*drain.Server).Started for one
// received by handoff), each session wakes its blocked read, and at the
// next frame boundary hands the connection to the new generation with a
// small record of the session ((*inherit.Handoffs).Handoff, kind "ws"),
// which continues the same loop on it. A frame begun is finished first.
// When the handoff fails (run standalone, under systemd, or by upgrader
// --no-handoff; or no new generation takes it) the session goes on here
// until its client ends it, and is closed politely (close frame 1001,
// going away) shortly before the drain's deadline; the drain waits for it
// meanwhile (drain.Server.Track). Idle keep-alive HTTP connections are
// handed off as in examples/hello.
//
// Under upgrader (or systemd socket activation) it serves every inherited
// stream listener; it binds -addr only when none is inherited. With
// -connect URL it is a client instead: each line of stdin is a message,
// each reply is printed.
//
//	upgrader -l 127.0.0.1:8080 -- echo
//	echo -connect ws://127.0.0.1:8080/ws
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/gobwas/ws"

	"github.com/seed6cb0314a/upgrader/drain"
	"github.com/seed6cb0314a/upgrader/inherit"
)

// kind is the handoff kind of a WebSocket session between two frames.
const kind = "ws"

// maxMessage bounds a message (and so a frame): larger ones are refused
// with close code 1009.
const maxMessage = 64 << 10

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "address to bind when no listener is inherited")
	drainTimeout := flag.Duration("drain-timeout", 25*time.Second, "close what is left of the connections after this")
	connect := flag.String("connect", "", "be a client instead: send each line of stdin to this ws:// URL, print each reply")
	flag.Parse()
	if *connect != "" {
		if err := client(*connect); err != nil {
			fmt.Fprintln(os.Stderr, "echo:", err)
			os.Exit(1)
		}
		return
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("worker", "echo", "pid", os.Getpid())
	fatal := func(err error) {
		log.Error("exiting", "error", err)
		os.Exit(1)
	}

	fds, err := inherit.New(inherit.WithLogger(log))
	if err != nil {
		fatal(err)
	}
	listeners, err := listen(fds, *addr)
	if err != nil {
		fatal(err)
	}
	for _, l := range listeners {
		log.Info("serving", "addr", l.Addr().String(), "inherited", fds.Inherited(l))
	}
	// Idle keep-alive HTTP connections and WebSocket sessions, in from a
	// draining generation and out to the next one (nil when not offered).
	handoffs, err := fds.Handoffs(inherit.KindHTTP, kind)
	if err != nil {
		fatal(err)
	}

	e := newEcho(inherit.Generation(), log, handoffs, *drainTimeout)
	if err := e.serve(context.Background(), listeners); err != nil {
		fatal(err)
	}
	handoffs.Close()
	log.Info("drained", "sessions_handed_off", e.handedOff.Load(), "sessions_closed_here", e.closedHere.Load())
}

// newEcho prepares the server of generation gen; handoffs may be nil.
func newEcho(gen int, log *slog.Logger, handoffs *inherit.Handoffs, drainTimeout time.Duration) *echo {
	e := &echo{gen: gen, log: log, handoffs: handoffs, timeout: drainTimeout, wsl: handoffs.Listener(kind)}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "echo: a WebSocket echo server (pid %d, generation %d); connect to /ws, "+
			"each text message is answered with \"<generation> <message>\"\n", os.Getpid(), e.gen)
	})
	mux.HandleFunc("GET /ws", e.serveWS)
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	e.d = drain.New(srv, drain.Options{Timeout: drainTimeout, Handoff: handoffs, Logger: log, OnDrain: func() {
		e.drainBegun()
		// Take no more sessions: upgrader sends them to the new generation.
		if e.wsl != nil {
			e.wsl.Close()
		}
	}})
	return e
}

// serve serves listeners and the sessions handed to this worker until
// ctx is done or the drain signal arrives, then drains: it returns once
// every session has ended here or gone to the new generation.
func (e *echo) serve(ctx context.Context, listeners []net.Listener) error {
	accepted := make(chan struct{})
	go func() {
		defer close(accepted)
		e.acceptSessions(e.wsl)
	}()
	if err := e.d.Serve(ctx, listeners); err != nil {
		return err
	}
	// Sessions taken just before the drain began were not accepted yet,
	// so the drain could not wait for them: serve them (they go on to the
	// new generation, or are closed politely at once).
	<-accepted
	return nil
}

// listen returns every inherited stream listener, or addr bound fresh when
// none was inherited.
func listen(fds *inherit.Set, addr string) ([]net.Listener, error) {
	byName, err := fds.Listeners()
	if err != nil {
		return nil, err
	}
	var all []net.Listener
	for _, ls := range byName {
		all = append(all, ls...)
	}
	if len(all) > 0 {
		return all, nil
	}
	l, err := fds.Listen("", "tcp", addr)
	if err != nil {
		return nil, err
	}
	return []net.Listener{l}, nil
}

type echo struct {
	gen      int
	log      *slog.Logger
	handoffs *inherit.Handoffs
	wsl      *inherit.Listener // sessions handed to us (nil without handoffs)
	d        *drain.Server
	timeout  time.Duration // the drain's

	seq        atomic.Int64 // sessions begun here
	handedOff  atomic.Int64
	closedHere atomic.Int64

	drainOnce sync.Once
	drainAt   atomic.Pointer[time.Time] // when the drain began
	hurryOnce sync.Once
	hurryAt   atomic.Pointer[time.Time] // when a second drain signal came
}

// record is a session's state, carried across handoffs.
type record struct {
	ID       string `json:"id"`
	Messages int    `json:"messages"` // answered so far, by every generation
}

// serveWS upgrades the request and runs the session on the handler's
// goroutine; the connection is the application's now (hijacked), and the
// drain waits for it until it is closed.
func (e *echo) serveWS(w http.ResponseWriter, r *http.Request) {
	conn, rw, _, err := ws.UpgradeHTTP(r, w)
	if err != nil {
		// ws wrote the refusal; after a hijack the connection is ours.
		if conn != nil {
			conn.Close()
		}
		return
	}
	s := e.newSession(conn, e.newRecord(), drain.Started(r.Context()))
	// A client speaks only after the handshake's response, so net/http
	// should hold none of its bytes; any it holds are read first.
	if n := rw.Reader.Buffered(); n > 0 {
		b, _ := rw.Reader.Peek(n)
		s.src.ahead = append([]byte(nil), b...)
	}
	s.run()
}

// acceptSessions continues the sessions handed to this worker until l is
// closed (at the drain) and every one taken has been accepted; it returns
// once they have all ended here or gone on.
func (e *echo) acceptSessions(l *inherit.Listener) {
	if l == nil {
		return
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		var rec record
		if _, st, _ := inherit.StateOf(c); json.Unmarshal(st, &rec) != nil || rec.ID == "" {
			e.log.Warn("handed-off session without a valid record, continued as a new one", "state", fmt.Sprintf("%q", st))
			rec = e.newRecord()
		}
		s := e.newSession(e.d.Track(c), rec, e.d.Started())
		wg.Go(s.run)
	}
}

// newRecord starts the record of a session begun here.
func (e *echo) newRecord() record {
	return record{ID: fmt.Sprintf("%d-%d-%d", e.gen, os.Getpid(), e.seq.Add(1))}
}

// drainBegun records when the drain began (the first to see it).
func (e *echo) drainBegun() {
	e.drainOnce.Do(func() {
		now := time.Now()
		e.drainAt.Store(&now)
	})
}

// closeAt is when sessions still here are closed politely: shortly before
// the drain's deadline, leaving time for the closing handshake. Zero
// before the drain.
func (e *echo) closeAt() time.Time {
	if at := e.hurryAt.Load(); at != nil {
		return *at // a second drain signal: now, before upgrader's kill
	}
	at := e.drainAt.Load()
	if at == nil {
		return time.Time{}
	}
	return at.Add(e.timeout - closeGrace(e.timeout))
}

// hurried records the second drain signal (the first to see it), after
// which sessions still here close politely at once.
func (e *echo) hurried() {
	e.hurryOnce.Do(func() {
		now := time.Now()
		e.hurryAt.Store(&now)
	})
}

// closeGrace is how long before the drain's deadline sessions are closed:
// a tenth of the drain, between 100 ms and 2 s.
func closeGrace(timeout time.Duration) time.Duration {
	return min(max(timeout/10, 100*time.Millisecond), 2*time.Second)
}

// aLongTimeAgo is a read deadline in the past: it wakes a blocked read.
var aLongTimeAgo = time.Unix(1, 0)

// session is one WebSocket connection. Only its goroutine (run) reads,
// writes and decides; the drain's watcher only wakes a read blocked
// between two frames.
type session struct {
	e       *echo
	rec     record
	conn    net.Conn // the drain's: closing it tells the drain the session is gone
	src     *source
	br      *bufio.Reader
	bw      *bufio.Writer
	started <-chan struct{} // closed when the drain begins
	gone    chan struct{}   // closed when run returns

	mu         sync.Mutex
	atBoundary bool // blocked (or about to block) between two frames

	// The rest belongs to run's goroutine.
	tried    bool      // a handoff was tried
	closing  bool      // our close frame is sent
	deadline time.Time // the read deadline between wake-ups: zero, or the closing handshake's end
	msg      []byte    // a fragmented message under way
	msgOp    ws.OpCode // its opcode; 0 when none is under way
}

// source is what a session's bufio.Reader reads: bytes read ahead of it
// (by net/http, before the upgrade), then the connection.
type source struct {
	ahead []byte
	conn  net.Conn
}

func (s *source) Read(p []byte) (int, error) {
	if len(s.ahead) > 0 {
		n := copy(p, s.ahead)
		s.ahead = s.ahead[n:]
		return n, nil
	}
	return s.conn.Read(p)
}

func (e *echo) newSession(conn net.Conn, rec record, started <-chan struct{}) *session {
	src := &source{conn: conn}
	return &session{e: e, rec: rec, conn: conn, src: src, br: bufio.NewReader(src), bw: bufio.NewWriter(conn),
		started: started, gone: make(chan struct{})}
}

// run serves the session until it ends here or goes to the new
// generation.
func (s *session) run() {
	defer close(s.gone)
	go s.watch()
	log := s.e.log.With("session", s.rec.ID)
	log.Debug("session begins here", "messages", s.rec.Messages)
	for {
		// Between two frames: the only place where the drain is acted on.
		s.mu.Lock()
		s.atBoundary = true
		if s.due() {
			s.conn.SetReadDeadline(aLongTimeAgo)
		}
		s.mu.Unlock()
		_, err := s.br.Peek(1)
		s.mu.Lock()
		s.atBoundary = false
		s.conn.SetReadDeadline(s.deadline)
		s.mu.Unlock()
		var ne net.Error
		switch {
		case err == nil:
			// A frame has begun: it is read whole before anything else.
			if end := s.frame(); end != nil {
				s.end(log, end)
				return
			}
		case errors.As(err, &ne) && ne.Timeout():
			// Woken with no byte of a next frame read: br is empty, and
			// so is what lies beneath it (src.ahead, and a handed-off
			// conn's own bytes, are read before the socket is).
			if s.closing && !time.Now().Before(s.deadline) {
				s.end(log, errors.New("no closing handshake from the client"))
				return
			}
			if s.act(log) {
				return
			}
		default:
			s.end(log, err)
			return
		}
	}
}

// watch wakes the session's read when the drain begins, and again when it
// is time to close it politely: shortly before the drain's deadline, or at
// once on a second drain signal.
func (s *session) watch() {
	select {
	case <-s.started:
	case <-s.gone:
		return
	}
	s.e.drainBegun()
	s.wake()
	t := time.NewTimer(time.Until(s.e.closeAt()))
	defer t.Stop()
	select {
	case <-t.C:
		s.wake()
	case <-s.e.d.Hurried():
		s.e.hurried()
		s.wake()
	case <-s.gone:
	}
}

// wake moves the read deadline to the past when the session waits between
// two frames; otherwise run sees what is due when it gets there (due).
func (s *session) wake() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.atBoundary {
		s.conn.SetReadDeadline(aLongTimeAgo)
	}
}

// due reports whether the session has something to do at this boundary:
// a handoff (the drain began, and no fragmented message is under way), or
// the polite close.
func (s *session) due() bool {
	if !s.draining() {
		return false
	}
	if !s.tried && s.msgOp == 0 {
		return true
	}
	return !s.closing && !time.Now().Before(s.e.closeAt())
}

func (s *session) draining() bool {
	select {
	case <-s.started:
		s.e.drainBegun()
		return true
	default:
		return false
	}
}

// act does what is due at a boundary; true when the session has gone to
// another generation.
func (s *session) act(log *slog.Logger) bool {
	if !s.draining() {
		return false
	}
	if !s.tried && s.msgOp == 0 {
		s.tried = true
		st, _ := json.Marshal(s.rec)
		// Nothing is buffered at a boundary; passed all the same, so that
		// no byte could be lost.
		buffered, _ := s.br.Peek(s.br.Buffered())
		buffered = append(slices.Clip(buffered), s.src.ahead...)
		err := s.e.handoffs.Handoff(s.conn, kind, st, buffered)
		if err == nil {
			s.e.handedOff.Add(1)
			log.Debug("session handed off", "messages", s.rec.Messages)
			return true
		}
		if errors.Is(err, inherit.ErrUnanswered) {
			// Handoff closed it: the next generation may have it.
			log.Debug("session's handoff went unanswered; closed here", "messages", s.rec.Messages)
			return true
		}
		log.Debug("session not handed off, it goes on here until the drain's end", "error", err)
	}
	if !s.closing && !time.Now().Before(s.e.closeAt()) {
		// The client's answer is awaited until the drain's deadline (when
		// the drain closes what is left).
		s.closing = true
		s.deadline = s.e.closeAt().Add(closeGrace(s.e.timeout))
		s.conn.SetReadDeadline(s.deadline)
		s.write(ws.OpClose, ws.NewCloseFrameBody(ws.StatusGoingAway, "server draining"))
	}
	return false
}

// end closes the session here for why (io.EOF: the client went).
func (s *session) end(log *slog.Logger, why error) {
	s.conn.Close()
	s.e.closedHere.Add(1)
	log.Debug("session ended", "messages", s.rec.Messages, "why", why)
}

// errClosed ends a session after the closing handshake.
var errClosed = errors.New("closed")

// frame reads one frame, payload and all, and answers it; a non-nil error
// ends the session.
func (s *session) frame() error {
	h, err := ws.ReadHeader(s.br)
	if err != nil {
		return err
	}
	if h.Length > maxMessage {
		return s.fail(ws.StatusMessageTooBig, "frame too big")
	}
	p := make([]byte, h.Length)
	if _, err := io.ReadFull(s.br, p); err != nil {
		return err
	}
	if !h.Masked {
		return s.fail(ws.StatusProtocolError, "unmasked client frame")
	}
	ws.Cipher(p, h.Mask, 0)
	if h.Rsv != 0 {
		return s.fail(ws.StatusProtocolError, "reserved bits set")
	}
	if h.OpCode.IsControl() {
		if !h.Fin || len(p) > ws.MaxControlFramePayloadSize {
			return s.fail(ws.StatusProtocolError, "bad control frame")
		}
		switch h.OpCode {
		case ws.OpPing:
			return s.write(ws.OpPong, p)
		case ws.OpPong:
			return nil
		case ws.OpClose:
			if s.closing {
				return errClosed // the answer to ours
			}
			// The client's: answer with its code (RFC 6455, 5.5.1).
			var body []byte
			if len(p) >= 2 {
				body = ws.NewCloseFrameBody(ws.StatusCode(binary.BigEndian.Uint16(p)), "")
			}
			s.write(ws.OpClose, body)
			return errClosed
		default:
			return s.fail(ws.StatusProtocolError, "unknown opcode")
		}
	}
	switch {
	case h.OpCode == ws.OpContinuation && s.msgOp == 0,
		h.OpCode != ws.OpContinuation && s.msgOp != 0:
		return s.fail(ws.StatusProtocolError, "bad fragmentation")
	case h.OpCode == ws.OpText, h.OpCode == ws.OpBinary:
		s.msgOp, s.msg = h.OpCode, p
	case h.OpCode == ws.OpContinuation:
		if len(s.msg)+len(p) > maxMessage {
			return s.fail(ws.StatusMessageTooBig, "message too big")
		}
		s.msg = append(s.msg, p...)
	default:
		return s.fail(ws.StatusProtocolError, "unknown opcode")
	}
	if !h.Fin {
		return nil
	}
	op, msg := s.msgOp, s.msg
	s.msgOp, s.msg = 0, nil
	if s.closing {
		return nil // no data after our close frame (RFC 6455, 5.5.1)
	}
	if op == ws.OpText && !utf8.Valid(msg) {
		return s.fail(ws.StatusInvalidFramePayloadData, "text is not UTF-8")
	}
	s.rec.Messages++
	return s.write(op, append([]byte(strconv.Itoa(s.e.gen)+" "), msg...))
}

// fail closes the session for a protocol error, telling the client why.
func (s *session) fail(code ws.StatusCode, reason string) error {
	s.write(ws.OpClose, ws.NewCloseFrameBody(code, reason))
	return errors.New(reason)
}

// write sends one unfragmented frame.
func (s *session) write(op ws.OpCode, p []byte) error {
	s.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if err := ws.WriteFrame(s.bw, ws.NewFrame(op, true, p)); err != nil {
		return err
	}
	return s.bw.Flush()
}
