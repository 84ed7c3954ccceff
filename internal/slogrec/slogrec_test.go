package slogrec

import (
	"errors"
	"log/slog"
	"testing"
	"time"
)

func TestRecorder(t *testing.T) {
	r := New()
	errBad := errors.New("bad")
	log := r.Logger().With("worker", 3).WithGroup("conn")
	go log.Warn("anything", "error", errBad, slog.Group("peer", "port", 80))
	rec, ok := r.Wait(10*time.Second, func(rec Record) bool { return rec.Attrs["conn.error"].Any() == errBad })
	if !ok {
		t.Fatalf("no record with conn.error: %+v", r.Records())
	}
	if rec.Level != slog.LevelWarn || rec.Attrs["worker"].Int64() != 3 || rec.Attrs["conn.peer.port"].Int64() != 80 {
		t.Fatalf("record %+v", rec)
	}
	if _, ok := r.Wait(0, func(Record) bool { return false }); ok {
		t.Fatal("Wait matched nothing, yet returned ok")
	}
}
