package confine

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/redis-agent/redis-agent/confine/filter"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

// The tests confine a child: the test binary run again with childEnv set
// to a scenario, which applies a Policy to itself, tries things and
// prints what happened as JSON. Confinement cannot be undone, so it never
// runs in the test process itself.
const childEnv = "CONFINE_TEST_CHILD"

func TestMain(m *testing.M) {
	if sc := os.Getenv(childEnv); sc != "" {
		child(sc)
		return
	}
	os.Exit(m.Run())
}

// scenario is what a child is told: the policy and the attempts.
type scenario struct {
	Policy  Policy
	Apply   bool
	Reads   []string
	Writes  []string
	Execs   []string
	Signal  int // a pid to send signal 0 and SIGCONT
	Unshare bool
	Clone   bool
}

// outcome is what a child saw: "" for success, else the error.
type outcome map[string]string

func child(raw string) {
	var sc scenario
	if err := json.Unmarshal([]byte(raw), &sc); err != nil {
		panic(err)
	}
	out := outcome{}
	if sc.Apply {
		if err := Apply(sc.Policy); err != nil {
			out["apply"] = err.Error()
		}
	}
	res := func(err error) string {
		if err == nil {
			return ""
		}
		return err.Error()
	}
	for _, f := range sc.Reads {
		_, err := os.ReadFile(f)
		out["read "+f] = res(err)
	}
	for _, f := range sc.Writes {
		err := os.WriteFile(f, []byte("x"), 0o600)
		out["write "+f] = res(err)
	}
	for _, f := range sc.Execs {
		// fork+exec of a file, as Redis never does but an attacker would.
		err := exec.Command(f).Run()
		out["exec "+f] = res(err)
	}
	if sc.Signal != 0 {
		out["signal 0"] = res(syscall.Kill(sc.Signal, 0))
		out["signal CONT"] = res(syscall.Kill(sc.Signal, syscall.SIGCONT))
	}
	if sc.Unshare {
		_, _, e := unix.Syscall(unix.SYS_UNSHARE, ^uintptr(0), 0, 0)
		out["unshare"] = res(errnoErr(e))
	}
	if sc.Clone {
		// CLONE_THREAD without CLONE_SIGHAND: the kernel refuses it
		// (EINVAL) before doing anything, the filter earlier (EPERM).
		_, _, e := unix.RawSyscall(unix.SYS_CLONE, unix.CLONE_NEWUSER|unix.CLONE_THREAD, 0, 0)
		out["clone newuser"] = res(errnoErr(e))
	}
	json.NewEncoder(os.Stdout).Encode(out)
	os.Exit(0)
}

func errnoErr(e syscall.Errno) error {
	if e == 0 {
		return nil
	}
	return e
}

func runChild(t *testing.T, sc scenario) outcome {
	t.Helper()
	raw, _ := json.Marshal(sc)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(raw))
	cmd.Stderr = os.Stderr
	b, err := cmd.Output()
	if err != nil {
		t.Fatalf("child: %v: %s", err, b)
	}
	var out outcome
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatalf("child said %q: %v", b, err)
	}
	if a, ok := out["apply"]; ok {
		t.Fatalf("child could not confine itself: %s", a)
	}
	return out
}

// denied reports whether an outcome is a permission error.
func denied(msg string) bool {
	return strings.Contains(msg, unix.EACCES.Error()) || strings.Contains(msg, unix.EPERM.Error())
}

func needKernel(t *testing.T) {
	t.Helper()
	s := Probe()
	if s.Landlock < 6 || !s.Seccomp {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI's kernel lacks %s", s.Missing())
		}
		t.Skipf("the kernel lacks %s", s.Missing())
	}
}

// A Landlock rule set: reads and writes where the policy grants them,
// nothing elsewhere, exec of the Exec files only; each checked unconfined
// first, so a denial is the policy's doing.
func TestLandlockRules(t *testing.T) {
	needKernel(t)
	root := t.TempDir()
	own, ro, other := filepath.Join(root, "own"), filepath.Join(root, "ro"), filepath.Join(root, "other")
	for _, d := range []string{own, ro, other} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	conf, secret := filepath.Join(ro, "redis.conf"), filepath.Join(other, "dump.rdb")
	for _, f := range []string{conf, secret, filepath.Join(own, "appendonly.aof")} {
		if err := os.WriteFile(f, []byte("data"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	truePath, err := exec.LookPath("true")
	if err != nil {
		t.Fatal(err)
	}
	sc := scenario{
		Policy: Policy{Exec: []string{os.Args[0]}, ReadOnly: []string{conf}, ReadWrite: []string{own}},
		Reads:  []string{conf, filepath.Join(own, "appendonly.aof"), secret, "/etc/passwd", "/proc/1/environ"},
		Writes: []string{filepath.Join(own, "new.rdb"), filepath.Join(own, "appendonly.aof"), conf, filepath.Join(other, "x"), filepath.Join(root, "x")},
		Execs:  []string{truePath},
	}
	free := runChild(t, sc)
	for k, v := range free {
		if v != "" && k != "read /proc/1/environ" {
			t.Fatalf("unconfined, %s failed (%s): the test cannot tell a denial", k, v)
		}
	}
	sc.Apply = true
	got := runChild(t, sc)
	want := map[string]bool{ // true: allowed
		"read " + conf: true, "read " + filepath.Join(own, "appendonly.aof"): true,
		"read " + secret: false, "read /etc/passwd": false, "read /proc/1/environ": false,
		"write " + filepath.Join(own, "new.rdb"): true, "write " + filepath.Join(own, "appendonly.aof"): true,
		"write " + conf: false, "write " + filepath.Join(other, "x"): false, "write " + filepath.Join(root, "x"): false,
		"exec " + truePath: false,
	}
	for k, allowed := range want {
		v, ok := got[k]
		switch {
		case !ok:
			t.Errorf("%s: no outcome", k)
		case allowed && v != "":
			t.Errorf("%s: %s, want allowed", k, v)
		case !allowed && !denied(v):
			t.Errorf("%s: %q, want permission denied", k, v)
		}
	}
}

// Signals to a process outside the domain (the agent, a neighbour) are
// refused by Landlock's scope, whatever the uids.
func TestLandlockSignalScope(t *testing.T) {
	needKernel(t)
	sc := scenario{Policy: Policy{Exec: []string{os.Args[0]}}, Signal: os.Getpid()}
	if free := runChild(t, sc); free["signal 0"] != "" {
		t.Fatalf("unconfined, signal 0 to the parent: %s", free["signal 0"])
	}
	sc.Apply = true
	got := runChild(t, sc)
	for _, k := range []string{"signal 0", "signal CONT"} {
		if !denied(got[k]) {
			t.Errorf("confined, %s to the parent: %q, want EPERM", k, got[k])
		}
	}
}

// The filter in the kernel: unshare and a namespace-making clone are
// refused with EPERM where the kernel alone answers EINVAL.
func TestSeccompInKernel(t *testing.T) {
	needKernel(t)
	sc := scenario{Policy: Policy{NoLandlock: true}, Unshare: true, Clone: true}
	free := runChild(t, sc)
	for _, k := range []string{"unshare", "clone newuser"} {
		if free[k] != unix.EINVAL.Error() {
			t.Fatalf("unconfined, %s: %q, want EINVAL", k, free[k])
		}
	}
	sc.Apply = true
	got := runChild(t, sc)
	for _, k := range []string{"unshare", "clone newuser"} {
		if got[k] != unix.EPERM.Error() {
			t.Errorf("confined, %s: %q, want EPERM", k, got[k])
		}
	}
}

// The table the launcher loads is what package filter assembles now: run
// go generate ./confine after changing the policy.
func TestProgramIsGenerated(t *testing.T) {
	raw, err := filter.Program()
	if err != nil {
		t.Fatal(err)
	}
	want := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		want[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	if !reflect.DeepEqual(seccompProgram, want) {
		t.Fatal("seccomp_bpf.go is not filter.Program(): run go generate ./confine")
	}
}

func TestParseRoundTrip(t *testing.T) {
	p := Policy{Exec: []string{"/usr/bin/redis-server"}, ReadOnly: []string{"/a/redis.conf", "/a/users.acl"}, ReadWrite: []string{"/a/data", "/l/a.log"}, NoSeccomp: true}
	got, argv, err := Parse(append(p.Args(), "--", "/usr/bin/redis-server", "/a/redis.conf"))
	if err != nil || !reflect.DeepEqual(got, p) || !reflect.DeepEqual(argv, []string{"/usr/bin/redis-server", "/a/redis.conf"}) {
		t.Fatalf("Parse(Args) = %+v, %q, %v; want %+v", got, argv, err, p)
	}
	for _, bad := range [][]string{{}, {"--"}, {"--ro"}, {"--ro", "relative", "--", "x"}, {"--bogus", "--", "x"}} {
		if _, _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) = nil error", bad)
		}
	}
}

func ExamplePolicy_Args() {
	p := Policy{Exec: []string{"/usr/bin/redis-server"}, ReadOnly: []string{"/d/i/redis.conf"}, ReadWrite: []string{"/d/i/data"}}
	fmt.Println(append(p.Args(), "--", "/usr/bin/redis-server", "/d/i/redis.conf"))
	// Output: [--exec /usr/bin/redis-server --ro /d/i/redis.conf --rw /d/i/data -- /usr/bin/redis-server /d/i/redis.conf]
}

// The launcher's own environment (one P for its Go runtime) stays its
// own: the command it execs gets the rest, as it was.
func TestLauncherEnvIsItsOwn(t *testing.T) {
	cmd := Command(t.Context(), testenv.Launcher(t), Policy{NoLandlock: true, NoSeccomp: true}, "/usr/bin/env")
	if !slices.Contains(cmd.Env, "GOMAXPROCS=1") {
		t.Fatalf("the launcher's Env is %q", cmd.Env)
	}
	cmd.Env = append(cmd.Env, "PATH=/usr/bin:/bin", "A=b")
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := strings.Fields(string(out)), []string{"PATH=/usr/bin:/bin", "A=b"}; !slices.Equal(got, want) {
		t.Fatalf("the command's environment is %q, want %q", got, want)
	}
	if got := commandEnv([]string{"GOMAXPROCS=4", "GOMAXPROCS=1", "X=y"}); !slices.Equal(got, []string{"GOMAXPROCS=4", "X=y"}) {
		t.Fatalf("commandEnv took %q", got)
	}
}
