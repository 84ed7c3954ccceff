package supervise

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"log/slog"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
	"github.com/seed6cb0314a/upgrader/internal/nodeipc"
)

// HandoffStats counts live connections passed between generations.
type HandoffStats struct {
	// Connections taken by a ready worker.
	HandedOff int `json:"handed_off"`
	// Connections refused (no target, target refused or failed); their
	// sender kept serving or closed them.
	Refused int `json:"refused"`
	// Malformed messages dropped.
	Malformed int `json:"malformed_messages"`
}

// pendingHandoff is a batch forwarded to a target that has not answered.
type pendingHandoff struct {
	from   *worker
	fromCh *wchan // the answer goes back where the batch came from
	fromID uint64
	to     *worker
	toCh   *wchan
	n      int
	out    *outMsg // as queued in the target's outbox
}

// wchan is one of a worker's open channels, with its queues: out for
// batches and answers for ACK and NAK, sent by writeHandoff.
type wchan struct {
	ch      channel
	out     chan *outMsg
	answers chan *outMsg
}

const (
	// outboxSize is how many batches may wait to be sent to one worker;
	// with at most 253 fds each, it bounds the fds held for a worker that
	// does not read. Answers (ACK, NAK) carry no fds and have a queue of
	// their own, answersSize deep, so that a sender that reads gets every
	// one however fast they come.
	outboxSize  = 16
	answersSize = 1024
	// sendTimeout bounds one send to a worker whose socket buffer is full.
	sendTimeout = 100 * time.Millisecond
	// maxUnanswered bounds the batches forwarded to one target that it
	// has not answered; past it the target is skipped.
	maxUnanswered = 64
	// answerTimeout bounds the wait for a target's answer to a batch.
	// Targets answer on receipt (docs/reference/handoff.md), within a millisecond or
	// so. Past it, a batch still in the target's outbox goes back to its
	// sender, refused, and the target is skipped until it answers again;
	// one already written to its socket is left to the sender's own
	// timeout (inherit.SendTimeout), since the target may still read it.
	answerTimeout = 2 * time.Second
	// parkTimeout bounds how long a batch waits for a replacement to be
	// ready, well within the senders' own timeout (inherit.SendTimeout,
	// 5 s); maxParkedFDs bounds the fds held meanwhile.
	parkTimeout  = 2 * time.Second
	maxParkedFDs = 1024
	// forwardMaxAge bounds a batch's age, from its arrival in upgrader's
	// socket (the kernel's stamp, SO_TIMESTAMPNS), when its writer comes
	// to send it to the target: an older one goes back to its sender
	// unsent. The sender takes back what has no answer after
	// inherit.SendTimeout (5 s), and a target refuses a batch that waited
	// in its own socket over 1 s (docs/reference/handoff.md), so a batch
	// written by 3 s is answered, or refused, before its sender gives
	// up; a batch parked for a replacement (parkTimeout) keeps a second.
	// A Node.js target's send (a handle at a time, each acknowledged by
	// Node) can outlast it: the age is checked before it begins only.
	forwardMaxAge = 3 * time.Second
	// relayFDTable is the fd table upgrader reserves at its start: room
	// for the parked fds and for the batches of several workers in
	// transit (each sends at most 4 of handoff.MaxFDs at once).
	relayFDTable = 4096
)

// outMsg is a message waiting in a worker's outbox; fds are closed once
// sent. state moves from queued to written, cancelled or expired exactly
// once: the loop may take back a batch only while it is still queued. A
// batch not written by sendBy (on the env's clock) is not written at all
// (expired).
type outMsg struct {
	m      handoff.Message
	fds    []int
	sendBy time.Time
	state  atomic.Int32
}

const (
	outQueued int32 = iota
	outWritten
	outCancelled
	outExpired // not written, too old (forwardMaxAge): the writer refuses it
)

var errOutboxFull = errors.New("the worker is not reading its handoff channel (outbox full)")

// router routes handoff batches between workers: the batches forwarded
// and not yet answered, by the id the supervisor gave them, and a
// round-robin cursor over targets.
type router struct {
	pending map[uint64]*pendingHandoff
	nextID  uint64
	rr      int
	// parked are batches that came when no worker could take them but a
	// replacement was starting, with their fds (parkedFDs in all).
	parked    []parkedBatch
	parkedFDs int
}

// parkedBatch is a HANDOFF from a sender, waiting for a target; at is
// when it arrived (env's clock).
type parkedBatch struct {
	from   *worker
	fromCh *wchan
	m      handoff.Message
	fds    []int
	at     time.Time
}

// openHandoff opens ch for w: a reader that turns what w sends into loop
// events, and a writer that sends what the loop queues, so that the loop
// never blocks on a worker's socket.
func (s *Supervisor) openHandoff(w *worker, ch channel) {
	c := &wchan{ch: ch, out: make(chan *outMsg, ch.outbox()), answers: make(chan *outMsg, answersSize)}
	w.chans = append(w.chans, c)
	go s.readHandoff(w, c)
	go s.writeHandoff(w, c, c.out, c.answers)
}

// writeHandoff sends c's queues until closeChannel closes them; a failed
// send goes back to the loop, which answers for it.
func (s *Supervisor) writeHandoff(w *worker, c *wchan, out, answers <-chan *outMsg) {
	for out != nil || answers != nil {
		var o *outMsg
		var ok bool
		select {
		case o, ok = <-answers:
			if !ok {
				answers = nil
				continue
			}
		case o, ok = <-out:
			if !ok {
				out = nil
				continue
			}
		}
		if !o.sendBy.IsZero() && s.env.now().After(o.sendBy) {
			// Too late for its sender's timeout: it goes back rather
			// than to a target that could take it after the sender has
			// taken it back. Not the target's doing: the answer timeout
			// leaves it be (outExpired).
			if o.state.CompareAndSwap(outQueued, outExpired) {
				id, n := o.m.ID, len(o.m.Conns)
				s.post(evFunc{func() {
					if s.ho.pending[id] != nil {
						s.log.Warn("handoff batch too old to send; its sender keeps its connections", slog.Int("pid", w.Pid),
							slog.Duration("max_age", forwardMaxAge), slog.Int("connections", n))
					}
					s.refuseBack(id, w, fmt.Errorf("batch older than %s, not sent to worker pid %d", forwardMaxAge, w.Pid), false)
				}})
			}
			handoff.CloseFDs(o.fds)
			continue
		}
		if !o.state.CompareAndSwap(outQueued, outWritten) {
			handoff.CloseFDs(o.fds) // taken back by the loop
			continue
		}
		err := c.ch.send(o.m, o.fds)
		handoff.CloseFDs(o.fds)
		var partial *nodeipc.PartialError
		if errors.As(err, &partial) {
			// Those it took are its own: the batch is taken.
			s.post(evFunc{func() {
				s.log.Warn("handoff target took part of a batch; the rest were closed", slog.Int("pid", w.Pid), slog.Any("error", err))
			}})
			err = nil
		}
		switch {
		case err != nil:
			s.post(evHandoffSendFailed{w: w, c: c, m: o.m, err: err})
		case o.m.Type == handoff.TypeHandoff && c.ch.takenOnSend():
			s.post(evHandoff{w: w, c: c, m: handoff.Message{Type: handoff.TypeAck, ID: o.m.ID}})
		}
	}
}

// send queues m with fds (which it takes over) on c without blocking; a
// non-zero sendBy is when its writer gives up on it (outMsg).
func (s *Supervisor) send(c *wchan, m handoff.Message, fds []int, sendBy time.Time) (*outMsg, error) {
	q := c.out
	if m.Type != handoff.TypeHandoff {
		q = c.answers
	}
	if q == nil {
		handoff.CloseFDs(fds)
		return nil, errors.New("handoff channel closed")
	}
	o := &outMsg{m: m, fds: fds, sendBy: sendBy}
	select {
	case q <- o:
		return o, nil
	default:
		handoff.CloseFDs(fds)
		return nil, errOutboxFull
	}
}

// readHandoff turns what w sends on c into loop events until c closes.
func (s *Supervisor) readHandoff(w *worker, c *wchan) {
	for {
		m, fds, n, err := c.ch.recv()
		switch {
		case err != nil && !isMalformed(err):
			s.post(evHandoffClosed{w, c})
			return
		case n != nil:
			s.post(evFunc{func() { s.onChannelNotify(w, n) }})
		default:
			s.post(evHandoff{w: w, c: c, m: m, fds: fds, err: err})
		}
	}
}

// onHandoff handles one message from w. This is where a live connection is
// handed off: a HANDOFF batch from a draining worker is forwarded to a
// ready worker of the newest generation; the target's ACK or NAK goes back
// to the sender, which keeps its copies until then.
func (s *Supervisor) onHandoff(w *worker, c *wchan, m handoff.Message, fds []int, err error) {
	if s.gens.byPid[w.Pid] != w || !w.hasChannel(c) {
		handoff.CloseFDs(fds)
		return
	}
	log := s.log.With(slog.Int("generation", w.gen.N), slog.Int("pid", w.Pid))
	if err != nil {
		handoff.CloseFDs(fds)
		s.count.Handoffs.Malformed++
		s.warn(w.Pid, "malformed handoff message from worker, dropped", slog.Int("generation", w.gen.N), slog.Int("pid", w.Pid), slog.Any("error", err))
		return
	}
	if m.Type != handoff.TypeHandoff {
		handoff.CloseFDs(fds) // only a batch carries fds
		fds = nil
	}
	switch m.Type {
	case handoff.TypeAccept:
		if s.cfg.NoHandoff {
			return
		}
		w.takeOn = c
		w.Accepts = make(map[string]bool)
		for _, k := range m.Kinds {
			w.Accepts[k] = true
		}
		log.Debug("worker takes handoffs", slog.Any("kinds", m.Kinds))
		s.flushParked() // it may be the target they wait for
	case handoff.TypeHandoff:
		// Its age counts from its arrival in upgrader's socket: the
		// reader or the loop may have been slow to get to it. The stamp
		// is on the kernel's clock, so the wait is measured there.
		at := s.env.now()
		if !m.Arrived.IsZero() {
			if waited := time.Since(m.Arrived); waited > 0 {
				at = at.Add(-waited)
			}
		}
		b := parkedBatch{from: w, fromCh: c, m: m, fds: fds, at: at}
		target := s.handoffTarget(w, m.Kind)
		switch {
		case target != nil:
			s.forward(b, target)
		case s.replacementComing() && s.ho.parkedFDs+len(fds) <= maxParkedFDs:
			// A worker replacing one of the serving generation is
			// starting (a crash, STOPPING=1): its connections wait
			// for it rather than close.
			s.ho.parked = append(s.ho.parked, b)
			s.ho.parkedFDs += len(fds)
			s.after(parkTimeout, evFunc{s.flushParked})
		default:
			s.refuseNoTarget(b)
		}
	case handoff.TypeAck, handoff.TypeNak:
		p := s.ho.pending[m.ID]
		if p == nil || p.to != w || p.toCh != c {
			s.warn(w.Pid, "handoff answer for an unknown batch, dropped", slog.Int("pid", w.Pid), slog.String("type", m.Type), slog.Uint64("id", m.ID))
			return
		}
		delete(s.ho.pending, m.ID)
		w.unanswered--
		w.stalled = false // it reads and answers again
		if m.Type == handoff.TypeAck {
			s.count.Handoffs.HandedOff += p.n
			s.reply(p.from, p.fromCh, handoff.Message{Type: handoff.TypeAck, ID: p.fromID})
			return
		}
		s.count.Handoffs.Refused += p.n
		log.Info("handoff refused by target", slog.String("reason", m.Reason), slog.Int("connections", p.n))
		s.reply(p.from, p.fromCh, handoff.Message{Type: handoff.TypeNak, ID: p.fromID, Reason: fmt.Sprintf("worker pid %d: %s", w.Pid, m.Reason)})
	default:
		s.warn(w.Pid, "unexpected handoff message from worker, dropped", slog.Int("pid", w.Pid), slog.String("type", m.Type))
	}
}

// forward sends batch b to target, renumbered; the answer goes back to
// b's sender.
func (s *Supervisor) forward(b parkedBatch, target *worker) {
	n := len(b.m.Conns)
	s.ho.nextID++
	fwd := b.m
	fwd.ID = s.ho.nextID
	o, err := s.send(target.takeOn, fwd, b.fds, b.at.Add(forwardMaxAge))
	if err != nil {
		s.count.Handoffs.Refused += n
		s.stall(target, err)
		s.reply(b.from, b.fromCh, handoff.Message{Type: handoff.TypeNak, ID: b.m.ID, Reason: fmt.Sprintf("forward to worker pid %d: %v", target.Pid, err)})
		return
	}
	target.unanswered++
	s.ho.pending[fwd.ID] = &pendingHandoff{from: b.from, fromCh: b.fromCh, fromID: b.m.ID, to: target, toCh: target.takeOn, n: n, out: o}
	s.after(answerTimeout, evHandoffTimeout{fwd.ID})
}

func (s *Supervisor) refuseNoTarget(b parkedBatch) {
	handoff.CloseFDs(b.fds)
	n := len(b.m.Conns)
	s.count.Handoffs.Refused += n
	s.log.Info("handoff refused: no target", slog.Int("generation", b.from.gen.N), slog.Int("pid", b.from.Pid),
		slog.String("kind", b.m.Kind), slog.Int("connections", n))
	s.reply(b.from, b.fromCh, handoff.Message{Type: handoff.TypeNak, ID: b.m.ID,
		Reason: fmt.Sprintf("no ready worker of the newest generation takes kind %s", b.m.Kind)})
}

// replacementComing reports whether a worker of the serving generation, or
// of the one an upgrade starts, is on its way: a batch with no target now
// may have one soon.
func (s *Supervisor) replacementComing() bool {
	if s.life.stopping {
		return false
	}
	for _, g := range []*generation{s.gens.current, s.gens.pending} {
		if g == nil {
			continue
		}
		for _, w := range g.slots {
			if w == nil || w.State == WorkerStarting {
				return true
			}
		}
	}
	return false
}

// flushParked forwards the parked batches that have a target now, refuses
// those parked parkTimeout ago (or all, once a stop began), drops those
// whose sender went away, and keeps the rest. It runs when a worker becomes ready or says what it takes, and at
// each batch's timeout.
func (s *Supervisor) flushParked() {
	now := s.env.now()
	kept := s.ho.parked[:0]
	for _, b := range s.ho.parked {
		gone := s.gens.byPid[b.from.Pid] != b.from || !b.from.hasChannel(b.fromCh)
		target := s.handoffTarget(b.from, b.m.Kind)
		switch {
		case gone:
			handoff.CloseFDs(b.fds) // its copies went with it
			s.ho.parkedFDs -= len(b.fds)
		case target != nil:
			s.ho.parkedFDs -= len(b.fds)
			s.forward(b, target)
		case now.Sub(b.at) >= parkTimeout || s.life.stopping:
			// A worker that became ready may say what it takes a moment
			// later (ACCEPT comes on another channel than READY=1): a
			// batch waits its full time.
			s.ho.parkedFDs -= len(b.fds)
			s.refuseNoTarget(b)
		default:
			kept = append(kept, b)
		}
	}
	clear(s.ho.parked[len(kept):])
	s.ho.parked = kept
}

// stall marks a target that did not take a batch: it is skipped until it
// answers one it has.
func (s *Supervisor) stall(w *worker, err error) {
	if !w.stalled {
		s.log.Warn("handoff target is not taking batches, skipping it", slog.Int("generation", w.gen.N),
			slog.Int("pid", w.Pid), slog.Any("error", err))
	}
	w.stalled = true
}

// onSendFailed answers for a message that could not be sent to w: a
// forwarded batch goes back to its sender, refused.
func (s *Supervisor) onSendFailed(w *worker, m handoff.Message, err error) {
	if m.Type != handoff.TypeHandoff {
		s.warn(w.Pid, "handoff reply failed", slog.Int("pid", w.Pid), slog.String("type", m.Type), slog.Any("error", err))
		return
	}
	s.refuseBack(m.ID, w, fmt.Errorf("forward to worker pid %d: %w", w.Pid, err), true)
}

// refuseBack ends a forwarded batch that its target w did not take: the
// sender gets a NAK and keeps serving its connections. With stall, w is
// to blame and is skipped until it answers again; a batch that grew too
// old before its turn is not w's doing.
func (s *Supervisor) refuseBack(id uint64, w *worker, err error, stall bool) {
	p := s.ho.pending[id]
	if p == nil || p.to != w {
		return // answered already, or the target went away
	}
	delete(s.ho.pending, id)
	w.unanswered--
	s.count.Handoffs.Refused += p.n
	if stall && w.State.running() {
		s.stall(w, err)
	}
	s.reply(p.from, p.fromCh, handoff.Message{Type: handoff.TypeNak, ID: p.fromID, Reason: err.Error()})
}

// onAnswerTimeout handles a batch its target has not answered in time: the
// target is skipped from now on, and the batch goes back to its sender if
// it is still in the outbox. One already written is the target's to take
// or not: the sender's own timeout reclaims it, and a NAK from here could
// let both serve one connection.
func (s *Supervisor) onAnswerTimeout(id uint64) {
	p := s.ho.pending[id]
	if p == nil {
		return
	}
	err := fmt.Errorf("worker pid %d did not answer within %s", p.to.Pid, answerTimeout)
	if p.out.state.CompareAndSwap(outQueued, outCancelled) {
		s.refuseBack(id, p.to, err, true)
		return
	}
	if p.out.state.Load() == outExpired {
		return // never written: its refusal is on its way from the writer
	}
	s.stall(p.to, err)
}

// handoffTarget picks, round robin, a ready worker of the active generation
// that takes kind, other than the sender.
func (s *Supervisor) handoffTarget(from *worker, kind string) *worker {
	g := s.gens.current
	if g == nil || s.life.stopping {
		return nil
	}
	n := len(g.slots)
	for i := 0; i < n; i++ {
		s.ho.rr++
		w := g.slots[s.ho.rr%n]
		if w != nil && w != from && w.State == WorkerReady && !w.asked() && w.takeOn != nil && w.Accepts[kind] &&
			!w.stalled && w.unanswered < w.takeOn.ch.maxUnanswered() {
			return w
		}
	}
	return nil
}

// reply sends an answer to w on c, the channel its batch came on.
func (s *Supervisor) reply(w *worker, c *wchan, m handoff.Message) {
	if s.gens.byPid[w.Pid] != w || !w.hasChannel(c) {
		return // the sender is gone: its copies went with it
	}
	if _, err := s.send(c, m, nil, time.Time{}); err != nil {
		s.warn(w.Pid, "handoff reply failed", slog.Int("pid", w.Pid), slog.String("type", m.Type), slog.Any("error", err))
	}
}

// hasChannel reports whether c is one of w's open channels.
func (w *worker) hasChannel(c *wchan) bool {
	for _, o := range w.chans {
		if o == c {
			return true
		}
	}
	return false
}

// closeHandoff closes all of w's channels.
func (s *Supervisor) closeHandoff(w *worker) {
	for len(w.chans) > 0 {
		s.closeChannel(w, w.chans[0])
	}
}

// closeChannel closes c, one of w's channels, and refuses what w had not
// answered on it.
func (s *Supervisor) closeChannel(w *worker, c *wchan) {
	if !w.hasChannel(c) {
		return
	}
	for i, o := range w.chans {
		if o == c {
			w.chans = append(w.chans[:i:i], w.chans[i+1:]...)
			break
		}
	}
	c.ch.close()
	close(c.out) // the writer fails what is left, fast, and closes its fds
	close(c.answers)
	if w.takeOn == c {
		w.takeOn, w.Accepts = nil, nil
	}
	// A sender that went away needs no answer (reply checks); a target
	// that went away refuses what it had not answered.
	for id, p := range s.ho.pending {
		if p.to == w && p.toCh == c {
			delete(s.ho.pending, id)
			w.unanswered--
			s.count.Handoffs.Refused += p.n
			s.reply(p.from, p.fromCh, handoff.Message{Type: handoff.TypeNak, ID: p.fromID, Reason: fmt.Sprintf("worker pid %d went away", w.Pid)})
		}
	}
}
