// Package handoff is the wire protocol that moves live connections between
// a draining worker and a ready one, through upgrader: SOCK_SEQPACKET
// messages (unix(7)) with a text header and, for HANDOFF, the connections'
// fds as SCM_RIGHTS. docs/reference/handoff.md is the specification for workers in
// other languages.
//
//	UPGRADER/1 ACCEPT kinds=http,counter
//	UPGRADER/1 HANDOFF id=7 kind=http n=2
//	state=0 buffered=0
//	state=5 buffered=3
//	<blank line>
//	<state of conn 1><buffered of conn 1><state of conn 2>…
//	UPGRADER/1 ACK id=7
//	UPGRADER/1 NAK id=7 reason=no ready worker takes kind http
package handoff

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Limits of the protocol.
const (
	// MaxFDs is the most connections in one HANDOFF: the kernel's SCM_MAX_FD.
	MaxFDs = 253
	// MaxState bounds one connection's application state, in bytes.
	MaxState = 64 << 10
	// MaxBuffered bounds the bytes a sender had read but not consumed.
	MaxBuffered = 64 << 10
	// MaxMessage bounds one message, header and payload, in bytes.
	MaxMessage = 192 << 10
	magic      = "UPGRADER/1 "
)

// Message types.
const (
	TypeAccept  = "ACCEPT"
	TypeHandoff = "HANDOFF"
	TypeAck     = "ACK"
	TypeNak     = "NAK"
)

// Conn is one connection's metadata in a HANDOFF; its fd travels separately.
type Conn struct {
	// State is application state the receiver resumes from (may be empty).
	State []byte
	// Buffered are bytes the sender read from the connection but did not
	// consume: the receiver must see them before anything read from the fd.
	Buffered []byte
}

// Message is one protocol message.
type Message struct {
	Type   string
	ID     uint64   // HANDOFF, ACK, NAK
	Kind   string   // HANDOFF
	Kinds  []string // ACCEPT
	Reason string   // NAK
	Conns  []Conn   // HANDOFF; len(Conns) is the number of fds
	// Arrived is when the kernel queued the message at the receiving end,
	// set by Recv on a Socket that StampArrivals; zero otherwise. Not on
	// the wire.
	Arrived time.Time
}

// ValidKind reports whether k is a valid kind: 1 to 32 of [a-z0-9._-].
func ValidKind(k string) bool {
	if len(k) == 0 || len(k) > 32 {
		return false
	}
	for _, c := range []byte(k) {
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// Encode renders m. It returns an error for a message the receiver would
// refuse (bad kind, too many connections, state or message too large).
func Encode(m Message) ([]byte, error) {
	var b bytes.Buffer
	b.WriteString(magic)
	switch m.Type {
	case TypeAccept:
		for _, k := range m.Kinds {
			if !ValidKind(k) {
				return nil, fmt.Errorf("handoff: kind %q is not 1-32 of [a-z0-9._-]", k)
			}
		}
		fmt.Fprintf(&b, "ACCEPT kinds=%s\n", strings.Join(m.Kinds, ","))
	case TypeAck:
		fmt.Fprintf(&b, "ACK id=%d\n", m.ID)
	case TypeNak:
		fmt.Fprintf(&b, "NAK id=%d reason=%s\n", m.ID, strings.ReplaceAll(m.Reason, "\n", " "))
	case TypeHandoff:
		if !ValidKind(m.Kind) {
			return nil, fmt.Errorf("handoff: kind %q is not 1-32 of [a-z0-9._-]", m.Kind)
		}
		if len(m.Conns) == 0 || len(m.Conns) > MaxFDs {
			return nil, fmt.Errorf("handoff: %d connections in one message, want 1 to %d", len(m.Conns), MaxFDs)
		}
		fmt.Fprintf(&b, "HANDOFF id=%d kind=%s n=%d\n", m.ID, m.Kind, len(m.Conns))
		for _, c := range m.Conns {
			if len(c.State) > MaxState || len(c.Buffered) > MaxBuffered {
				return nil, fmt.Errorf("handoff: state of %d or buffered %d bytes over the limits (%d, %d)", len(c.State), len(c.Buffered), MaxState, MaxBuffered)
			}
			// Per connection: strconv, not fmt, a batch has 253 of them.
			b.WriteString("state=")
			b.WriteString(strconv.Itoa(len(c.State)))
			b.WriteString(" buffered=")
			b.WriteString(strconv.Itoa(len(c.Buffered)))
			b.WriteByte('\n')
		}
		b.WriteString("\n")
		for _, c := range m.Conns {
			b.Write(c.State)
			b.Write(c.Buffered)
		}
	default:
		return nil, fmt.Errorf("handoff: unknown message type %q", m.Type)
	}
	if b.Len() > MaxMessage {
		return nil, fmt.Errorf("handoff: message of %d bytes over %d", b.Len(), MaxMessage)
	}
	return b.Bytes(), nil
}

// ErrMalformed wraps every Parse error.
var ErrMalformed = errors.New("malformed handoff message")

// Parse parses one message. nfds is the number of fds that came with it:
// a HANDOFF must carry exactly n, any other message none. Errors wrap
// ErrMalformed and quote the offending input.
func Parse(b []byte, nfds int) (Message, error) {
	if len(b) > MaxMessage {
		return Message{}, malformed("%d bytes, over %d", len(b), MaxMessage)
	}
	h, rest, err := parseHeader(b, nfds)
	if err != nil {
		return Message{}, err
	}
	m := Message{Type: h.typ, Reason: h.reason}
	switch h.typ {
	case TypeAccept:
		m.Kinds, err = h.kinds()
	case TypeAck, TypeNak:
		if err = h.need("id"); err == nil {
			m.ID, err = h.id()
		}
	case TypeHandoff:
		err = h.handoff(&m, rest, nfds)
	default:
		err = malformed("unknown message type %.20q", h.typ)
	}
	if err != nil {
		return Message{}, err
	}
	return m, nil
}

// malformed returns an error wrapping ErrMalformed.
func malformed(format string, a ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrMalformed}, a...)...)
}

// header is a message's first line: its type, the line after the magic
// (which errors quote), a NAK's reason, and the key=value fields.
type header struct {
	typ, line, reason string
	fields            map[string]string
}

// parseHeader parses b's first line and returns it with what follows it.
// Only a HANDOFF may carry fds or have more than its header line.
func parseHeader(b []byte, nfds int) (header, []byte, error) {
	first, rest, ok := bytes.Cut(b, []byte("\n"))
	if !ok {
		return header{}, nil, malformed("header %.60q has no newline", b)
	}
	line, ok := strings.CutPrefix(string(first), magic)
	if !ok {
		return header{}, nil, malformed("header %.60q does not start with %q", first, magic)
	}
	typ, args, _ := strings.Cut(line, " ")
	h := header{typ: typ, line: line, fields: map[string]string{}}
	if typ != TypeHandoff && nfds != 0 {
		return header{}, nil, malformed("%s message carried %d fds", typ, nfds)
	}
	if typ != TypeHandoff && len(rest) != 0 {
		return header{}, nil, malformed("%s message has %d bytes after its header line", typ, len(rest))
	}
	if typ == TypeNak {
		// reason= runs to the end of the line.
		var found bool
		args, h.reason, found = strings.Cut(args, " reason=")
		if !found {
			return header{}, nil, malformed("NAK %.60q has no reason=", line)
		}
	}
	for _, kv := range strings.Fields(args) {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return header{}, nil, malformed("field %.40q in %.60q is not key=value", kv, line)
		}
		if _, dup := h.fields[k]; dup {
			return header{}, nil, malformed("field %q repeated in %.60q", k, line)
		}
		h.fields[k] = v
	}
	return h, rest, nil
}

// need checks that the header has exactly the fields keys.
func (h header) need(keys ...string) error {
	for _, k := range keys {
		if _, ok := h.fields[k]; !ok {
			return malformed("%s %.60q lacks %s=", h.typ, h.line, k)
		}
	}
	if len(h.fields) != len(keys) {
		return malformed("%s %.60q has fields other than %v", h.typ, h.line, keys)
	}
	return nil
}

// id parses the id= field.
func (h header) id() (uint64, error) {
	id, err := strconv.ParseUint(h.fields["id"], 10, 64)
	if err != nil {
		return 0, malformed("id %q is not a number", h.fields["id"])
	}
	return id, nil
}

// kinds parses an ACCEPT's kinds= field, which may be empty.
func (h header) kinds() ([]string, error) {
	if err := h.need("kinds"); err != nil {
		return nil, err
	}
	if h.fields["kinds"] == "" {
		return nil, nil
	}
	var kinds []string
	for _, k := range strings.Split(h.fields["kinds"], ",") {
		if !ValidKind(k) {
			return nil, malformed("kind %.40q is not 1-32 of [a-z0-9._-]", k)
		}
		kinds = append(kinds, k)
	}
	return kinds, nil
}

// handoff fills in a HANDOFF's id, kind and connections from its header
// and rest, what follows the header line: one line per connection, a
// blank line, then the connections' state and buffered bytes.
func (h header) handoff(m *Message, rest []byte, nfds int) error {
	if err := h.need("id", "kind", "n"); err != nil {
		return err
	}
	id, err := h.id()
	if err != nil {
		return err
	}
	m.ID, m.Kind = id, h.fields["kind"]
	if !ValidKind(m.Kind) {
		return malformed("kind %.40q is not 1-32 of [a-z0-9._-]", m.Kind)
	}
	n, err := strconv.Atoi(h.fields["n"])
	if err != nil || n < 1 || n > MaxFDs {
		return malformed("n=%.20q is not 1 to %d", h.fields["n"], MaxFDs)
	}
	if n != nfds {
		return malformed("n=%d but %d fds came with the message", n, nfds)
	}
	sizes, payload, err := connLines(rest, n)
	if err != nil {
		return err
	}
	m.Conns, err = splitPayload(payload, sizes)
	return err
}

// connLines parses the n connection lines at the start of rest, and the
// blank line after them; it returns each connection's state and buffered
// sizes, and the payload that follows.
func connLines(rest []byte, n int) (sizes [][2]int, payload []byte, err error) {
	sizes = make([][2]int, n)
	for i := range n {
		var l []byte
		var ok bool
		l, rest, ok = bytes.Cut(rest, []byte("\n"))
		if !ok {
			return nil, nil, malformed("connection line %d missing", i+1)
		}
		st, bu, ok := parseConnLine(l)
		if !ok {
			return nil, nil, malformed("connection line %.60q is not state=N buffered=N", l)
		}
		if st < 0 || st > MaxState || bu < 0 || bu > MaxBuffered {
			return nil, nil, malformed("connection line %.60q over the limits (%d, %d)", l, MaxState, MaxBuffered)
		}
		sizes[i] = [2]int{st, bu}
	}
	payload, ok := bytes.CutPrefix(rest, []byte("\n"))
	if !ok {
		return nil, nil, malformed("no blank line after the connection lines")
	}
	return sizes, payload, nil
}

// parseConnLine parses "state=N buffered=N", each N an integer in
// canonical decimal (what strconv.Itoa writes: no "+", no leading zero,
// no "-0"; a negative one is then refused by the limits), without fmt's
// Sscanf and Sprintf, which showed in a profile of a 10,000-connection
// handoff in upgrader and in the receiving worker (docs/benchmarks.md).
func parseConnLine(l []byte) (st, bu int, ok bool) {
	rest, ok := bytes.CutPrefix(l, []byte("state="))
	if !ok {
		return 0, 0, false
	}
	sp := bytes.IndexByte(rest, ' ')
	if sp < 0 {
		return 0, 0, false
	}
	num, tail := rest[:sp], rest[sp+1:]
	if st, ok = canonicalInt(num); !ok {
		return 0, 0, false
	}
	if tail, ok = bytes.CutPrefix(tail, []byte("buffered=")); !ok {
		return 0, 0, false
	}
	bu, ok = canonicalInt(tail)
	return st, bu, ok
}

func canonicalInt(b []byte) (int, bool) {
	n, err := strconv.Atoi(string(b))
	return n, err == nil && strconv.Itoa(n) == string(b)
}

// splitPayload cuts payload into the connections' state and buffered
// bytes, by sizes; it must hold exactly that. Each slice is capped, so
// that an append to one cannot overwrite the next.
func splitPayload(payload []byte, sizes [][2]int) ([]Conn, error) {
	var conns []Conn
	for _, sz := range sizes {
		if len(payload) < sz[0]+sz[1] {
			return nil, malformed("payload is %d bytes short", sz[0]+sz[1]-len(payload))
		}
		conns = append(conns, Conn{State: payload[:sz[0]:sz[0]], Buffered: payload[sz[0] : sz[0]+sz[1] : sz[0]+sz[1]]})
		payload = payload[sz[0]+sz[1]:]
	}
	if len(payload) != 0 {
		return nil, malformed("%d bytes after the payload", len(payload))
	}
	return conns, nil
}
