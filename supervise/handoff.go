package supervise

import (
	"errors"
	"fmt"

	"go.uber.org/zap"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
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
	fromID uint64
	to     *worker
	n      int
}

// readHandoff turns w's handoff channel into loop events until it closes.
func (s *Supervisor) readHandoff(w *worker, sock *handoff.Socket) {
	for {
		m, fds, err := sock.Recv()
		if err != nil && !errors.Is(err, handoff.ErrMalformed) {
			s.post(evHandoffClosed{w})
			return
		}
		s.post(evHandoff{w: w, m: m, fds: fds, err: err})
	}
}

// onHandoff handles one message from w. This is where a live connection is
// handed off: a HANDOFF batch from a draining worker is forwarded to a
// ready worker of the newest generation; the target's ACK or NAK goes back
// to the sender, which keeps its copies until then.
func (s *Supervisor) onHandoff(w *worker, m handoff.Message, fds []int, err error) {
	// The kernel duplicated the fds into the forwarded message: ours are
	// never needed past this point.
	defer handoff.CloseFDs(fds)
	if s.workers[w.pid] != w {
		return
	}
	log := s.log.With(zap.Int("generation", w.gen.n), zap.Int("pid", w.pid))
	if err != nil {
		s.hoStats.Malformed++
		log.Warn("malformed handoff message from worker, dropped", zap.Error(err))
		return
	}
	switch m.Type {
	case handoff.TypeAccept:
		w.accepts = make(map[string]bool)
		for _, k := range m.Kinds {
			w.accepts[k] = true
		}
		log.Debug("worker takes handoffs", zap.Strings("kinds", m.Kinds))
	case handoff.TypeHandoff:
		n := len(m.Conns)
		target := s.handoffTarget(w, m.Kind)
		if target == nil {
			s.hoStats.Refused += n
			log.Info("handoff refused: no target", zap.String("kind", m.Kind), zap.Int("connections", n))
			s.reply(w, handoff.Message{Type: handoff.TypeNak, ID: m.ID,
				Reason: fmt.Sprintf("no ready worker of the newest generation takes kind %s", m.Kind)})
			return
		}
		s.nextHOID++
		fwd := m
		fwd.ID = s.nextHOID
		if err := target.hsock.Send(fwd, fds); err != nil {
			s.hoStats.Refused += n
			log.Warn("handoff forward failed", zap.Int("target_pid", target.pid), zap.Error(err))
			s.reply(w, handoff.Message{Type: handoff.TypeNak, ID: m.ID, Reason: fmt.Sprintf("forward to worker pid %d: %v", target.pid, err)})
			return
		}
		s.pendingHO[fwd.ID] = &pendingHandoff{from: w, fromID: m.ID, to: target, n: n}
	case handoff.TypeAck, handoff.TypeNak:
		p := s.pendingHO[m.ID]
		if p == nil || p.to != w {
			log.Warn("handoff answer for an unknown batch, dropped", zap.String("type", m.Type), zap.Uint64("id", m.ID))
			return
		}
		delete(s.pendingHO, m.ID)
		if m.Type == handoff.TypeAck {
			s.hoStats.HandedOff += p.n
			s.reply(p.from, handoff.Message{Type: handoff.TypeAck, ID: p.fromID})
			return
		}
		s.hoStats.Refused += p.n
		log.Info("handoff refused by target", zap.String("reason", m.Reason), zap.Int("connections", p.n))
		s.reply(p.from, handoff.Message{Type: handoff.TypeNak, ID: p.fromID, Reason: fmt.Sprintf("worker pid %d: %s", w.pid, m.Reason)})
	default:
		log.Warn("unexpected handoff message from worker, dropped", zap.String("type", m.Type))
	}
}

// handoffTarget picks, round robin, a ready worker of the active generation
// that takes kind, other than the sender.
func (s *Supervisor) handoffTarget(from *worker, kind string) *worker {
	g := s.current
	if g == nil || s.stopping {
		return nil
	}
	n := len(g.slots)
	for i := 0; i < n; i++ {
		s.rr++
		w := g.slots[s.rr%n]
		if w != nil && w != from && w.state == WorkerReady && !w.asked && w.hsock != nil && w.accepts[kind] {
			return w
		}
	}
	return nil
}

func (s *Supervisor) reply(w *worker, m handoff.Message) {
	if s.workers[w.pid] != w || w.hsock == nil {
		return // the sender is gone: its copies went with it
	}
	if err := w.hsock.Send(m, nil); err != nil {
		s.log.Warn("handoff reply failed", zap.Int("pid", w.pid), zap.String("type", m.Type), zap.Error(err))
	}
}

// closeHandoff closes w's channel and refuses what it had not answered.
func (s *Supervisor) closeHandoff(w *worker) {
	if w.hsock == nil {
		return
	}
	w.hsock.Close()
	w.hsock = nil
	w.accepts = nil
	// A sender that went away needs no answer (reply checks); a target
	// that went away refuses what it had not answered.
	for id, p := range s.pendingHO {
		if p.to == w {
			delete(s.pendingHO, id)
			s.hoStats.Refused += p.n
			s.reply(p.from, handoff.Message{Type: handoff.TypeNak, ID: p.fromID, Reason: fmt.Sprintf("worker pid %d went away", w.pid)})
		}
	}
}
