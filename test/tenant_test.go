package test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/redis-agent/redis-agent/internal/testenv"
)

// What a tenant gets, as its client libraries see it: a binding of an
// instance with TLS optional, used through go-redis from its uri and its
// rediss:// uri as handed out (verifying the server against the CA the
// binding carries), and through redis-cli --tls --cacert: RESP3,
// client-side caching, pub/sub, streams, scripts, functions, the
// administrative commands a managed Redis allows and those it refuses.
func TestClientLibraries(t *testing.T) {
	testenv.RedisServer(t)
	dataDir := testenv.TraversableDir(t)
	killRedisUnder(t, dataDir)
	a := runAgent(t, agentOpts{dataDir: dataDir})
	var in instance
	if code := a.do("PUT", "/v1/instances/lib", `{"memory_mb":32,"persistence":"aof","tls":"optional","maxmemory_policy":"allkeys-lru","maxmemory_clients":"20%"}`, &in); code != 201 {
		t.Fatalf("provision = %d", code)
	}
	if in.TLS != "optional" || in.TLSPort == 0 || in.MaxmemoryPolicy != "allkeys-lru" || in.MaxmemoryClients != "20%" {
		t.Fatalf("instance %+v", in)
	}
	cr := mustBind(t, a, "lib", "app")
	if cr.TLSPort != in.TLSPort || !strings.HasPrefix(cr.TLSURI, "rediss://") || !strings.HasPrefix(cr.CACert, "-----BEGIN CERTIFICATE-----") {
		t.Fatalf("credentials %+v", cr)
	}
	// GET /v1/ca serves the binding's CA.
	ca := a.get("/v1/ca")
	if ca != cr.CACert {
		t.Fatalf("GET /v1/ca = %q, want the binding's ca_cert", ca)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(cr.CACert)) {
		t.Fatal("ca_cert holds no certificate")
	}
	clients := map[string]func(protocol int) *goredis.Client{
		"uri": func(protocol int) *goredis.Client {
			o, err := goredis.ParseURL(cr.URI)
			if err != nil {
				t.Fatal(err)
			}
			o.Protocol, o.MaxRetries = protocol, -1
			c := goredis.NewClient(o)
			t.Cleanup(func() { c.Close() })
			return c
		},
		"tls_uri": func(protocol int) *goredis.Client {
			o, err := goredis.ParseURL(cr.TLSURI)
			if err != nil {
				t.Fatal(err)
			}
			o.TLSConfig.RootCAs = pool
			o.Protocol, o.MaxRetries = protocol, -1
			c := goredis.NewClient(o)
			t.Cleanup(func() { c.Close() })
			return c
		},
	}
	for name, newClient := range clients {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			c := newClient(3)
			// RESP3: HELLO 3 answers a map.
			hello, err := c.Do(ctx, "HELLO", "3").Result()
			if m, ok := hello.(map[any]any); err != nil || !ok || m["proto"] != int64(3) {
				t.Fatalf("HELLO 3 = %v (%T), %v", hello, hello, err)
			}
			if err := c.Set(ctx, "k", "v", 0).Err(); err != nil {
				t.Fatal(err)
			}
			// Scripts and functions.
			if v, err := c.Eval(ctx, "return redis.call('GET', KEYS[1])", []string{"k"}).Text(); err != nil || v != "v" {
				t.Fatalf("EVAL = %q, %v", v, err)
			}
			sha, err := c.ScriptLoad(ctx, "return ARGV[1]").Result()
			if err != nil {
				t.Fatal(err)
			}
			if v, err := c.EvalSha(ctx, sha, nil, "x").Text(); err != nil || v != "x" {
				t.Fatalf("EVALSHA = %q, %v", v, err)
			}
			lib := "#!lua name=lib" + name[:1] + "\nredis.register_function('hi" + name[:1] + "', function(keys, args) return 'hi ' .. args[1] end)"
			if err := c.FunctionLoadReplace(ctx, lib).Err(); err != nil {
				t.Fatalf("FUNCTION LOAD: %v", err)
			}
			if v, err := c.FCall(ctx, "hi"+name[:1], nil, "there").Text(); err != nil || v != "hi there" {
				t.Fatalf("FCALL = %q, %v", v, err)
			}
			// Streams, with a consumer group.
			stream := "s-" + name
			if err := c.XAdd(ctx, &goredis.XAddArgs{Stream: stream, Values: map[string]any{"f": "1"}}).Err(); err != nil {
				t.Fatal(err)
			}
			if err := c.XGroupCreate(ctx, stream, "g", "0").Err(); err != nil {
				t.Fatal(err)
			}
			msgs, err := c.XReadGroup(ctx, &goredis.XReadGroupArgs{Group: "g", Consumer: "c1", Streams: []string{stream, ">"}, Count: 1}).Result()
			if err != nil || len(msgs) != 1 || len(msgs[0].Messages) != 1 {
				t.Fatalf("XREADGROUP = %v, %v", msgs, err)
			}
			if err := c.XAck(ctx, stream, "g", msgs[0].Messages[0].ID).Err(); err != nil {
				t.Fatal(err)
			}
			// Pub/sub.
			sub := c.Subscribe(ctx, "news-"+name)
			if _, err := sub.Receive(ctx); err != nil {
				t.Fatal(err)
			}
			if err := newClient(2).Publish(ctx, "news-"+name, "hello").Err(); err != nil {
				t.Fatal(err)
			}
			if m, err := sub.ReceiveMessage(ctx); err != nil || m.Payload != "hello" {
				t.Fatalf("pub/sub = %v, %v", m, err)
			}
			sub.Close()
			// Client-side caching: tracking, invalidations redirected to a
			// connection subscribed to __redis__:invalidate.
			inv, invID := invalidations(t, name, cr, pool)
			tracked := newClient(2)
			conn := tracked.Conn()
			defer conn.Close()
			if err := conn.Do(ctx, "CLIENT", "TRACKING", "on", "REDIRECT", invID).Err(); err != nil {
				t.Fatalf("CLIENT TRACKING: %v", err)
			}
			if err := conn.Get(ctx, "k").Err(); err != nil {
				t.Fatal(err)
			}
			c.Set(ctx, "k", "v2", 0)
			select {
			case key := <-inv:
				if key != "k" {
					t.Fatalf("invalidation of %q, want k", key)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("no invalidation")
			}
			// What a managed Redis allows: BullMQ's getWorkers (CLIENT
			// LIST), a tenant's own slow queries (SLOWLOG), ...
			if list, err := c.ClientList(ctx).Result(); err != nil || !strings.Contains(list, "user=app") {
				t.Fatalf("CLIENT LIST = %q, %v", list, err)
			}
			c.Eval(ctx, "local t = redis.call('TIME'); while true do local n = redis.call('TIME'); if (n[1]-t[1])*1000000 + (n[2]-t[2]) > 20000 then break end end return 1", nil)
			if logs, err := c.SlowLogGet(ctx, 10).Result(); err != nil || len(logs) == 0 {
				t.Fatalf("SLOWLOG GET = %v, %v; want the slow script", logs, err)
			}
			for _, cmd := range [][]any{{"LATENCY", "LATEST"}, {"ROLE"}, {"LASTSAVE"}, {"MEMORY", "STATS"}, {"INFO", "everything"}, {"ACL", "WHOAMI"}, {"CLIENT", "NO-EVICT", "on"}} {
				if err := c.Do(ctx, cmd...).Err(); err != nil {
					t.Errorf("%v: %v", cmd, err)
				}
			}
			for _, cmd := range [][]any{{"CONFIG", "GET", "*"}, {"ACL", "LIST"}, {"SHUTDOWN"}, {"BGSAVE"}, {"REPLICAOF", "127.0.0.1", "1"}, {"FAILOVER"}, {"MIGRATE", "127.0.0.1", "1", "k", "0", "100"}} {
				if err := c.Do(ctx, cmd...).Err(); err == nil || !strings.Contains(err.Error(), "NOPERM") {
					t.Errorf("%v = %v, want NOPERM", cmd, err)
				}
			}
		})
	}

	// redis-cli, verifying against the CA file: the host's own client.
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(caFile, []byte(cr.CACert), 0o600)
	cli, err := exec.LookPath("redis-cli")
	if err != nil {
		cli = filepath.Join(filepath.Dir(testenv.RedisServer(t)), "redis-cli")
	}
	out, err := exec.Command(cli, "-h", cr.Host, "-p", strconv.Itoa(cr.TLSPort), "--tls", "--cacert", caFile,
		"--user", cr.Username, "--pass", cr.Password, "--no-auth-warning", "GET", "k").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "v2" {
		t.Fatalf("redis-cli --tls --cacert: %q, %v", out, err)
	}
	out, err = exec.Command(cli, "-u", cr.TLSURI, "--cacert", caFile, "--no-auth-warning", "PING").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "PONG" {
		t.Fatalf("redis-cli -u rediss:// --cacert: %q, %v", out, err)
	}
	// Without the CA, redis-cli refuses the certificate.
	out, _ = exec.Command(cli, "-h", cr.Host, "-p", strconv.Itoa(cr.TLSPort), "--tls", "--user", cr.Username, "--pass", cr.Password,
		"--no-auth-warning", "PING").CombinedOutput()
	if strings.Contains(string(out), "PONG") {
		t.Fatalf("redis-cli --tls without the CA: %q; want a verification failure", out)
	}

	// TLS required, by PATCH: the binding's uri is now the rediss:// one.
	if code := a.do("PATCH", "/v1/instances/lib", `{"tls":"required"}`, &in); code != 200 || in.TLS != "required" {
		t.Fatalf("PATCH tls required = %d %+v", code, in)
	}
	var cr2 credentials
	a.do("GET", "/v1/instances/lib/bindings/app", "", &cr2)
	if cr2.URI != cr2.TLSURI || cr2.Port != in.TLSPort {
		t.Fatalf("credentials with tls required: %+v", cr2)
	}
	out, err = exec.Command(cli, "-u", cr2.URI, "--cacert", caFile, "--no-auth-warning", "PING").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "PONG" {
		t.Fatalf("redis-cli -u (required) --cacert: %q, %v", out, err)
	}
	if code := a.do("PATCH", "/v1/instances/lib", `{"maxmemory_policy":"lru"}`, nil); code != 422 {
		t.Fatalf("PATCH an unknown policy = %d, want 422", code)
	}
	a.do("DELETE", "/v1/instances/lib", "", nil)
}

// get returns the body of a GET that must answer 200.
func (a *agentProc) get(path string) string {
	a.t.Helper()
	req, _ := http.NewRequest("GET", a.base+path, nil)
	if a.token != "" {
		req.Header.Set("Authorization", "Bearer "+a.token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		a.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		a.t.Fatalf("GET %s = %d %s", path, resp.StatusCode, b)
	}
	return string(b)
}

// invalidations subscribes a connection of its own (over TLS, verifying
// against pool) to __redis__:invalidate and returns the keys it is told
// of, and its client id for CLIENT TRACKING ... REDIRECT.
func invalidations(t *testing.T, name string, cr credentials, pool *x509.CertPool) (<-chan string, string) {
	t.Helper()
	var c net.Conn
	var err error
	addr := net.JoinHostPort(cr.Host, strconv.Itoa(cr.TLSPort))
	if name == "uri" {
		c, err = net.Dial("tcp", net.JoinHostPort(cr.Host, strconv.Itoa(cr.Port)))
	} else {
		c, err = tls.Dial("tcp", addr, &tls.Config{RootCAs: pool, ServerName: cr.Host})
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	r := bufio.NewReader(c)
	fmt.Fprintf(c, "AUTH %s %s\r\nCLIENT ID\r\nSUBSCRIBE __redis__:invalidate\r\n", cr.Username, cr.Password)
	if l, _ := r.ReadString('\n'); l != "+OK\r\n" {
		t.Fatalf("AUTH: %q", l)
	}
	id, _ := r.ReadString('\n')
	id = strings.TrimSpace(strings.TrimPrefix(id, ":"))
	out := make(chan string, 16)
	go func() {
		for {
			l, err := r.ReadString('\n')
			if err != nil {
				return
			}
			// *3 $7 message $20 __redis__:invalidate *1 $1 k
			if strings.HasPrefix(l, "$") && l != "$7\r\n" && l != "$20\r\n" {
				n, _ := strconv.Atoi(strings.TrimSpace(l[1:]))
				b := make([]byte, n+2)
				if _, err := io.ReadFull(r, b); err != nil {
					return
				}
				if s := string(b[:n]); s != "message" && s != "__redis__:invalidate" && s != "subscribe" {
					out <- s
				}
			}
		}
	}()
	return out, id
}
