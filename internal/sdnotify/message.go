// Package sdnotify implements both ends of the sd_notify(3) protocol: parsing
// the newline-separated KEY=VALUE datagrams that services send to
// $NOTIFY_SOCKET, and a server socket that receives them together with the
// sender's SCM_CREDENTIALS and any SCM_RIGHTS fds (unix(7)).
package sdnotify

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
)

// MaxMessageSize is the largest datagram accepted, in bytes. systemd reads
// notify datagrams into a buffer of the same size (NOTIFY_BUFFER_MAX).
const MaxMessageSize = 4096

// Field is one KEY=VALUE assignment of a notify message.
type Field struct {
	Key   string
	Value string
}

// Message is a parsed notify datagram: its assignments in the order sent.
type Message []Field

// Get returns the value of the last assignment to key, and whether there was one.
// systemd applies assignments in order, so a later one wins.
func (m Message) Get(key string) (string, bool) {
	for i := len(m) - 1; i >= 0; i-- {
		if m[i].Key == key {
			return m[i].Value, true
		}
	}
	return "", false
}

// Is reports whether key was assigned exactly value.
func (m Message) Is(key, value string) bool {
	v, ok := m.Get(key)
	return ok && v == value
}

// ErrEmpty is returned by Parse for a datagram with no assignment in it.
var ErrEmpty = errors.New("empty notify message")

// Parse parses one sd_notify(3) datagram: assignments separated by "\n", an
// optional trailing newline, blank lines ignored.
//
// It returns an error, naming the offending line, when the datagram is larger
// than MaxMessageSize, contains a NUL byte, has a line without "=" or with an
// empty or malformed key, or assigns a well-known key (READY, STOPPING,
// RELOADING, WATCHDOG, ERRNO, EXTEND_TIMEOUT_USEC, MAINPID, FDSTORE,
// FDSTOREREMOVE, FDPOLL, BUSERROR excepted) a value that sd_notify(3) does not
// define. Unknown keys are kept: systemd ignores them and so do callers.
func Parse(b []byte) (Message, error) {
	if len(b) > MaxMessageSize {
		return nil, fmt.Errorf("notify message of %d bytes is larger than %d", len(b), MaxMessageSize)
	}
	if i := bytes.IndexByte(b, 0); i >= 0 {
		return nil, fmt.Errorf("notify message has a NUL byte at offset %d", i)
	}
	var m Message
	for line := range bytes.SplitSeq(b, []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		k, v, ok := bytes.Cut(line, []byte("="))
		if !ok {
			return nil, fmt.Errorf("notify line %q is not KEY=VALUE", truncate(line))
		}
		if err := checkKey(k); err != nil {
			return nil, fmt.Errorf("notify line %q: %w", truncate(line), err)
		}
		f := Field{Key: string(k), Value: string(v)}
		if err := checkValue(f); err != nil {
			return nil, fmt.Errorf("notify line %q: %w", truncate(line), err)
		}
		m = append(m, f)
	}
	if len(m) == 0 {
		return nil, ErrEmpty
	}
	return m, nil
}

// checkKey follows systemd's env_name_is_valid: [A-Za-z_][A-Za-z0-9_]*.
func checkKey(k []byte) error {
	if len(k) == 0 {
		return errors.New("empty key")
	}
	for i, c := range k {
		switch {
		case c == '_', 'A' <= c && c <= 'Z', 'a' <= c && c <= 'z':
		case '0' <= c && c <= '9' && i > 0:
		default:
			return fmt.Errorf("key has invalid character %q", c)
		}
	}
	return nil
}

func checkValue(f Field) error {
	switch f.Key {
	case "READY", "STOPPING", "RELOADING", "FDSTORE", "FDSTOREREMOVE", "FDPOLL":
		if f.Value != "1" && !(f.Key == "FDPOLL" && f.Value == "0") {
			return fmt.Errorf("%s must be 1, not %q", f.Key, f.Value)
		}
	case "WATCHDOG":
		if f.Value != "1" && f.Value != "trigger" {
			return fmt.Errorf("WATCHDOG must be 1 or trigger, not %q", f.Value)
		}
	case "ERRNO", "MAINPID", "EXTEND_TIMEOUT_USEC", "WATCHDOG_USEC", "MONOTONIC_USEC":
		if _, err := strconv.ParseUint(f.Value, 10, 64); err != nil {
			return fmt.Errorf("%s must be a non-negative integer, not %q", f.Key, f.Value)
		}
	}
	return nil
}

func truncate(b []byte) string {
	const max = 64
	if len(b) > max {
		return string(b[:max]) + "…"
	}
	return string(b)
}
