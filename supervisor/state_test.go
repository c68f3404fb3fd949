package supervisor

import (
	"bytes"
	"errors"
	"go/parser"
	"go/token"
	"log/slog"
	"slices"
	"strings"
	"testing"
)

var allStates = []State{Starting, Running, Backoff, Crashloop, Stopping, Stopped}

func TestTransitions(t *testing.T) {
	// Every legal edge, with what takes it; every other pair is illegal.
	legal := []struct {
		name     string
		from, to State
	}{
		{"first spawn or adoption", Starting, Starting},
		{"PONG", Starting, Running},
		{"exit before ready, or a failed first spawn", Starting, Backoff},
		{"fast failures while starting", Starting, Crashloop},
		{"Stop or Replace while starting", Starting, Stopping},
		{"crash or hang", Running, Backoff},
		{"crash or hang after fast failures", Running, Crashloop},
		{"Stop or Replace while running", Running, Stopping},
		{"timer, or Replace, spawns", Backoff, Starting},
		{"a spawn that fails again", Backoff, Backoff},
		{"a spawn that fails once too often", Backoff, Crashloop},
		{"Stop in backoff", Backoff, Stopping},
		{"timer, or Replace, spawns from crashloop", Crashloop, Starting},
		{"Replace clears the count, its spawn fails", Crashloop, Backoff},
		{"a spawn that fails in crashloop", Crashloop, Crashloop},
		{"Stop in crashloop", Crashloop, Stopping},
		{"Replace spawns", Stopping, Starting},
		{"Replace's spawn fails", Stopping, Backoff},
		{"Replace's spawn fails, crashloop after one failure", Stopping, Crashloop},
		{"Stop after a Replace whose process survived SIGKILL", Stopping, Stopping},
		{"Stop ends", Stopping, Stopped},
	}
	isLegal := map[[2]State]bool{}
	for _, tt := range legal {
		isLegal[[2]State{tt.from, tt.to}] = true
		t.Run(tt.name, func(t *testing.T) {
			if err := checkTransition(tt.from, tt.to); err != nil {
				t.Fatalf("checkTransition(%v, %v) = %v, want legal", tt.from, tt.to, err)
			}
		})
	}
	illegal := []struct {
		name     string
		from, to State
	}{
		{"a restart goes through stopping", Running, Starting},
		{"running is not entered twice", Running, Running},
		{"Stop goes through stopping", Running, Stopped},
		{"nothing runs in backoff to become ready", Backoff, Running},
		{"nothing runs in crashloop to become ready", Crashloop, Running},
		{"no process comes back from stopped", Stopped, Starting},
		{"stopped is final", Stopped, Stopped},
		{"an unknown state", Running, State(42)},
	}
	for _, tt := range illegal {
		t.Run(tt.name, func(t *testing.T) {
			if err := checkTransition(tt.from, tt.to); !errors.Is(err, errIllegalTransition) {
				t.Fatalf("checkTransition(%v, %v) = %v, want %v", tt.from, tt.to, err, errIllegalTransition)
			}
		})
	}
	// And every pair not listed as legal is illegal.
	for _, from := range allStates {
		for _, to := range allStates {
			err := checkTransition(from, to)
			if isLegal[[2]State{from, to}] != (err == nil) {
				t.Errorf("checkTransition(%v, %v) = %v; legal in the table above: %v", from, to, err, isLegal[[2]State{from, to}])
			}
		}
	}
}

// The edge table in the package doc is the one transition enforces.
func TestDocListsTheTransitions(t *testing.T) {
	f, err := parser.ParseFile(token.NewFileSet(), "supervisor.go", nil, parser.ParseComments|parser.PackageClauseOnly)
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]State{}
	for _, s := range allStates {
		byName[s.String()] = s
	}
	lines := strings.Split(f.Doc.Text(), "\n")
	i := slices.IndexFunc(lines, func(l string) bool { return strings.Join(strings.Fields(l), " ") == "from to" })
	if i < 0 {
		t.Fatal(`no "from to" table in the package doc`)
	}
	doc := map[State][]State{}
	for _, l := range lines[i+1:] {
		f := strings.Fields(l)
		if len(f) == 0 {
			break
		}
		from, ok := byName[f[0]]
		if !ok {
			t.Fatalf("doc table row %q: unknown state %q", l, f[0])
		}
		doc[from] = []State{}
		for _, n := range f[1:] {
			to, ok := byName[n]
			if !ok {
				t.Fatalf("doc table row %q: unknown state %q", l, n)
			}
			doc[from] = append(doc[from], to)
		}
	}
	for _, s := range allStates {
		got, ok := doc[s]
		if want := transitions[s]; !ok || !slices.Equal(got, want) {
			t.Errorf("doc: %v -> %v (row found: %v); transitions: %v -> %v", s, got, ok, s, transitions[s])
		}
	}
}

// A refused transition keeps the state, applies the rest of the update,
// logs an error and calls the hook (which panics in the other tests).
func TestIllegalTransitionIsRefused(t *testing.T) {
	var buf bytes.Buffer
	s := New(Config{Logger: slog.New(slog.NewTextHandler(&buf, nil))})
	var refused [][2]State
	s.illegal = func(from, to State) { refused = append(refused, [2]State{from, to}) }
	l := &loop{s: s}
	if st := l.transition(Stopping, nil); st.State != Stopping {
		t.Fatalf("starting -> stopping: state %v", st.State)
	}
	st := l.transition(Running, func(st *Status) { st.Restarts = 7 })
	if st.State != Stopping || st.Restarts != 7 || s.Status() != st {
		t.Fatalf("after stopping -> running: %+v (Status %+v); want stopping, and the rest applied", st, s.Status())
	}
	if len(refused) != 1 || refused[0] != [2]State{Stopping, Running} {
		t.Fatalf("hook calls %v, want one for stopping -> running", refused)
	}
	if log := buf.String(); !strings.Contains(log, "level=ERROR") || !strings.Contains(log, "from=stopping to=running") {
		t.Fatalf("log %q; want an error naming the edge", log)
	}
}
