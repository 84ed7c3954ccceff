// Package slogrec is a slog.Handler that keeps every record, for tests of
// the packages that log through a *slog.Logger their caller passes: a test
// looks for a record by its level and attributes (the error it carries,
// the input it names), never by the message's wording, which is free to
// change.
package slogrec

import (
	"context"
	"log/slog"
	"slices"
	"sync"
	"time"
)

// Record is one log record: its level and its attributes, those added by
// Logger.With included, keyed by name (groups joined with dots).
type Record struct {
	Level slog.Level
	Attrs map[string]slog.Value
}

// Recorder keeps the records of every Logger made from it.
type Recorder struct {
	mu      sync.Mutex
	changed chan struct{} // closed and replaced on every record
	records []Record
}

// New returns an empty Recorder.
func New() *Recorder {
	return &Recorder{changed: make(chan struct{})}
}

// Logger returns a logger that records into r, at every level.
func (r *Recorder) Logger() *slog.Logger {
	return slog.New(&handler{r: r})
}

// Records returns the records so far, oldest first.
func (r *Recorder) Records() []Record {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.records)
}

// Wait returns the first record for which match holds, waiting for it up
// to timeout; ok is false if none came.
func (r *Recorder) Wait(timeout time.Duration, match func(Record) bool) (rec Record, ok bool) {
	deadline := time.After(timeout)
	for i := 0; ; {
		r.mu.Lock()
		recs, changed := r.records[i:], r.changed
		r.mu.Unlock()
		for _, rec := range recs {
			if match(rec) {
				return rec, true
			}
		}
		i += len(recs)
		select {
		case <-changed:
		case <-deadline:
			return Record{}, false
		}
	}
}

func (r *Recorder) add(rec Record) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.records = append(r.records, rec)
	close(r.changed)
	r.changed = make(chan struct{})
}

type handler struct {
	r      *Recorder
	prefix string // the open groups, each followed by a dot
	attrs  []slog.Attr
	keys   []string // attrs' keys with the prefix they were added under
}

func (h *handler) Enabled(context.Context, slog.Level) bool { return true }

func (h *handler) Handle(_ context.Context, rec slog.Record) error {
	out := Record{Level: rec.Level, Attrs: map[string]slog.Value{}}
	for i, a := range h.attrs {
		put(out.Attrs, h.keys[i], a)
	}
	rec.Attrs(func(a slog.Attr) bool {
		put(out.Attrs, h.prefix+a.Key, a)
		return true
	})
	h.r.add(out)
	return nil
}

// put stores a under key, a group's members under key.member.
func put(m map[string]slog.Value, key string, a slog.Attr) {
	v := a.Value.Resolve()
	if v.Kind() != slog.KindGroup {
		m[key] = v
		return
	}
	for _, g := range v.Group() {
		put(m, key+"."+g.Key, g)
	}
}

func (h *handler) WithAttrs(as []slog.Attr) slog.Handler {
	n := *h
	n.attrs, n.keys = slices.Clone(h.attrs), slices.Clone(h.keys)
	for _, a := range as {
		n.attrs = append(n.attrs, a)
		n.keys = append(n.keys, h.prefix+a.Key)
	}
	return &n
}

func (h *handler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	n := *h
	n.prefix += name + "."
	return &n
}
