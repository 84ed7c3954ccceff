package main

import (
	"slices"
	"testing"

	"github.com/seed6cb0314a/upgrader/internal/earlysig"
	"github.com/seed6cb0314a/upgrader/internal/spawn"
	"github.com/seed6cb0314a/upgrader/supervise"
)

// TestEarlySignalsAreTheSupervisors: earlysig keeps its own copies, to
// depend on nothing but os/signal; a signal the supervisor handles that it
// did not catch would take its default action during the start-up, and a
// shim it did not recognise would swallow its command's drain signal.
func TestEarlySignalsAreTheSupervisors(t *testing.T) {
	want, got := supervise.CaughtSignals(), earlysig.Signals
	if !slices.Equal(got, want) {
		t.Errorf("earlysig.Signals = %v, supervise.CaughtSignals() = %v", got, want)
	}
	if earlysig.ShimArg != spawn.ShimArg {
		t.Errorf("earlysig.ShimArg = %q, spawn.ShimArg = %q", earlysig.ShimArg, spawn.ShimArg)
	}
}
