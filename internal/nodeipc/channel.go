package nodeipc

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
	"github.com/seed6cb0314a/upgrader/internal/sdnotify"
)

// Names of upgrader's messages: the value of their "upgrader" field.
const (
	MsgReady    = "ready"
	MsgStopping = "stopping"
	MsgStatus   = "status"
	MsgWatchdog = "watchdog"
	MsgAccept   = "accept"
	MsgHandoff  = "handoff"
	MsgAck      = "ack"
	MsgNak      = "nak"
)

// maxID is the largest id a JavaScript number holds exactly, 2^53−1.
const maxID = 1<<53 - 1

// maxStatus bounds a status text, as sd_notify's datagram does.
const maxStatus = sdnotify.MaxMessageSize

// Channel speaks upgrader's messages (docs/reference/node-ipc.md) on a
// Conn, in the handoff protocol's terms (internal/handoff) and
// sd_notify(3)'s.
type Channel struct{ *Conn }

// Incoming is one message from a worker: a handoff message (Handoff set,
// FDs its connections' fds, owned by the receiver) or sd_notify(3)
// assignments (Notify).
type Incoming struct {
	Handoff *handoff.Message
	FDs     []int
	Notify  sdnotify.Message
}

// message is any of upgrader's messages, either way.
type message struct {
	Upgrader string      `json:"upgrader"`
	ID       json.Number `json:"id,omitempty"`
	Kind     string      `json:"kind,omitempty"`
	Kinds    []string    `json:"kinds,omitempty"`
	State    *string     `json:"state,omitempty"`
	Buffered *string     `json:"buffered,omitempty"`
	Text     *string     `json:"text,omitempty"`
	Reason   string      `json:"reason,omitempty"`
}

// Recv returns the next message of upgrader's from the worker. Errors
// wrapping ErrMalformed are about one message (dropped, its fd closed; a
// handoff with a readable id answered nak) and Recv may be called again;
// others end the channel. Application messages that are not upgrader's are
// skipped.
func (ch *Channel) Recv() (Incoming, error) {
	for {
		raw, err := ch.Conn.Recv()
		if err != nil {
			return Incoming{}, err
		}
		in, ok, err := ch.decode(raw)
		if err != nil || ok {
			return in, err
		}
	}
}

func (ch *Channel) decode(raw Msg) (Incoming, bool, error) {
	var probe struct {
		Upgrader json.RawMessage `json:"upgrader"`
	}
	if json.Unmarshal(raw.JSON, &probe) != nil || len(probe.Upgrader) == 0 {
		if raw.FD >= 0 {
			unix.Close(raw.FD)
			return Incoming{}, false, fmt.Errorf("%w: a socket with a message that is not upgrader's: %.80q", ErrMalformed, raw.JSON)
		}
		return Incoming{}, false, nil // the application's own
	}
	var m message
	if err := json.Unmarshal(raw.JSON, &m); err != nil || m.Upgrader == "" {
		if raw.FD >= 0 {
			unix.Close(raw.FD)
		}
		return Incoming{}, false, fmt.Errorf("%w: %.80q: not one of upgrader's messages", ErrMalformed, raw.JSON)
	}
	if m.Upgrader != MsgHandoff && raw.FD >= 0 {
		unix.Close(raw.FD)
		return Incoming{}, false, fmt.Errorf("%w: a socket with %q, which carries none", ErrMalformed, m.Upgrader)
	}
	switch m.Upgrader {
	case MsgReady:
		return notify("READY", "1"), true, nil
	case MsgStopping:
		return notify("STOPPING", "1"), true, nil
	case MsgWatchdog:
		return notify("WATCHDOG", "1"), true, nil
	case MsgStatus:
		if m.Text == nil {
			return Incoming{}, false, fmt.Errorf("%w: status without a text", ErrMalformed)
		}
		t := strings.NewReplacer("\n", " ", "\x00", "").Replace(*m.Text)
		if len(t) > maxStatus {
			t = t[:maxStatus]
		}
		return notify("STATUS", t), true, nil
	case MsgAccept:
		for _, k := range m.Kinds {
			if !handoff.ValidKind(k) {
				return Incoming{}, false, fmt.Errorf("%w: accept: kind %.40q is not 1-32 of [a-z0-9._-]", ErrMalformed, k)
			}
		}
		return Incoming{Handoff: &handoff.Message{Type: handoff.TypeAccept, Kinds: m.Kinds}}, true, nil
	case MsgHandoff:
		return ch.decodeHandoff(m, raw)
	default:
		return Incoming{}, false, fmt.Errorf("%w: unknown message %.40q", ErrMalformed, m.Upgrader)
	}
}

func notify(k, v string) Incoming {
	return Incoming{Notify: sdnotify.Message{{Key: k, Value: v}}}
}

// decodeHandoff checks a handoff; one with a readable id and anything else
// wrong is answered nak here, its socket closed.
func (ch *Channel) decodeHandoff(m message, raw Msg) (Incoming, bool, error) {
	id, err := parseID(m.ID)
	if err != nil {
		if raw.FD >= 0 {
			unix.Close(raw.FD)
		}
		return Incoming{}, false, fmt.Errorf("%w: handoff: %v", ErrMalformed, err)
	}
	c, err := decodeConn(m, raw)
	if err != nil {
		if raw.FD >= 0 {
			unix.Close(raw.FD)
		}
		ch.Conn.Send(message{Upgrader: MsgNak, ID: json.Number(fmt.Sprint(id)), Reason: err.Error()})
		return Incoming{}, false, fmt.Errorf("%w: handoff id %d: %v", ErrMalformed, id, err)
	}
	return Incoming{Handoff: &handoff.Message{Type: handoff.TypeHandoff, ID: id, Kind: m.Kind, Conns: []handoff.Conn{c}},
		FDs: []int{raw.FD}}, true, nil
}

func parseID(n json.Number) (uint64, error) {
	var id uint64
	if _, err := fmt.Sscan(string(n), &id); err != nil || fmt.Sprint(id) != string(n) || id == 0 || id > maxID {
		return 0, fmt.Errorf("id %.30q is not an integer from 1 to 2^53-1", string(n))
	}
	return id, nil
}

func decodeConn(m message, raw Msg) (handoff.Conn, error) {
	switch {
	case !raw.Handle:
		return handoff.Conn{}, errors.New("no socket came with it (send it with process.send(msg, socket, {keepOpen: true}))")
	case raw.FD < 0:
		return handoff.Conn{}, errors.New("its socket did not arrive")
	case !handoff.ValidKind(m.Kind):
		return handoff.Conn{}, fmt.Errorf("kind %.40q is not 1-32 of [a-z0-9._-]", m.Kind)
	}
	var c handoff.Conn
	var err error
	if c.State, err = decode64("state", m.State, handoff.MaxState); err != nil {
		return c, err
	}
	c.Buffered, err = decode64("buffered", m.Buffered, handoff.MaxBuffered)
	return c, err
}

func decode64(field string, s *string, max int) ([]byte, error) {
	if s == nil || *s == "" {
		return nil, nil
	}
	if base64.StdEncoding.DecodedLen(len(*s)) > max+2 {
		return nil, fmt.Errorf("%s: over %d bytes", field, max)
	}
	b, err := base64.StdEncoding.DecodeString(*s)
	if err != nil {
		return nil, fmt.Errorf("%s: not base64: %v", field, err)
	}
	if len(b) > max {
		return nil, fmt.Errorf("%s: %d bytes, over %d", field, len(b), max)
	}
	return b, nil
}

// PartialError is returned by Send when the peer took some of a HANDOFF's
// connections and not the rest: the ones it took are its own, so the
// batch counts as taken; the rest were not delivered.
type PartialError struct {
	Taken, Of int
	Err       error
}

func (e *PartialError) Error() string {
	return fmt.Sprintf("node IPC: the worker took %d of %d connections: %v", e.Taken, e.Of, e.Err)
}

func (e *PartialError) Unwrap() error { return e.Err }

// Send sends m to the worker: ACK and NAK as ack and nak, a HANDOFF as one
// handoff message per connection with its fd from fds (which stay open in
// the caller). A HANDOFF is sent when the worker holds every connection
// (NODE_HANDLE_ACK): nil; none: the first error; some: a *PartialError.
func (ch *Channel) Send(m handoff.Message, fds []int) error {
	id := json.Number(fmt.Sprint(m.ID))
	switch m.Type {
	case handoff.TypeAck:
		return ch.Conn.Send(message{Upgrader: MsgAck, ID: id})
	case handoff.TypeNak:
		return ch.Conn.Send(message{Upgrader: MsgNak, ID: id, Reason: m.Reason})
	case handoff.TypeHandoff:
		if len(fds) != len(m.Conns) {
			return fmt.Errorf("node IPC: %d fds for %d connections", len(fds), len(m.Conns))
		}
		for i, c := range m.Conns {
			state, buffered := base64.StdEncoding.EncodeToString(c.State), base64.StdEncoding.EncodeToString(c.Buffered)
			err := ch.SendHandle(message{Upgrader: MsgHandoff, ID: id, Kind: m.Kind, State: &state, Buffered: &buffered}, fds[i])
			if err != nil && i == 0 {
				return err
			}
			if err != nil {
				return &PartialError{Taken: i, Of: len(fds), Err: err}
			}
		}
		return nil
	default:
		return fmt.Errorf("node IPC: no message for %q", m.Type)
	}
}
