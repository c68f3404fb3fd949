// Package redis holds what is specific to Redis: it renders an instance's
// redis.conf and ACL file, and talks to a running redis-server as the
// agent's admin user (PING, INFO, ACL, CONFIG SET, BGSAVE, SHUTDOWN) over
// one kept connection of its own (conn.go), so the agent's control never
// depends on a free client slot.
// It knows nothing about processes, state or HTTP.
package redis

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/redis-agent/redis-agent/apitype"
)

// AdminUser is the ACL user the agent itself logs in as.
const AdminUser = "agent"

// ValidPersistence reports whether mode is one Render knows (the modes
// are apitype's).
func ValidPersistence(mode string) bool {
	return slices.Contains(apitype.Persistences, mode)
}

// Conf is what goes into an instance's redis.conf.
type Conf struct {
	Bind        string
	Port        int
	Dir         string // data directory
	LogFile     string
	ACLFile     string
	MemoryMB    int
	Persistence string
	// MaxClients is the most client connections the server takes; 0
	// leaves Redis's default (10000, fewer under a low open-files limit).
	MaxClients int
	// ReplicaOf, when set, makes the server a replica of that primary (the
	// target of a move, until it is promoted).
	ReplicaOf *Primary
	// MaxmemoryPolicy is maxmemory-policy; "" is noeviction.
	MaxmemoryPolicy string
	// MaxmemoryClients is maxmemory-clients ("10%", "8mb"); "" or "0" is
	// none.
	MaxmemoryClients string
	// TLS, when set, opens a TLS port next to (or, Required, instead of)
	// the plain one.
	TLS *TLS
}

// TLS is an instance's TLS listener.
type TLS struct {
	Port int
	// CertFile and KeyFile are the server's certificate and key, CAFile
	// the CA that signed it (Redis wants one; clients are not asked for
	// certificates).
	CertFile, KeyFile, CAFile string
	// Required closes the plain port.
	Required bool
}

// tlsProtocols are the TLS versions an instance speaks.
const tlsProtocols = "TLSv1.2 TLSv1.3"

// TLSSettings are the CONFIG SET pairs that make a running server's TLS
// what t says (nil: off), its plain port included: port is the plain
// port the server has while TLS is not required.
func TLSSettings(t *TLS, port int) []string {
	if t == nil {
		return []string{"port", strconv.Itoa(port), "tls-port", "0"}
	}
	plain := port
	if t.Required {
		plain = 0
	}
	return []string{
		"tls-cert-file", t.CertFile, "tls-key-file", t.KeyFile, "tls-ca-cert-file", t.CAFile,
		"tls-auth-clients", "no", "tls-protocols", tlsProtocols,
		"tls-port", strconv.Itoa(t.Port), "port", strconv.Itoa(plain),
	}
}

// Primary is where a replica replicates from, and how it logs in there.
type Primary struct {
	Host     string `json:"host"`
	Port     int    `json:"port"`
	User     string `json:"user"`
	Password string `json:"password"`
	// TLS links over TLS (tls-replication), verifying the primary against
	// the server's tls-ca-cert-file.
	TLS bool `json:"tls,omitempty"`
}

// Render returns the redis.conf text for c. The output depends only on c,
// so its hash tells whether a running process has the current config.
func Render(c Conf) []byte {
	var b strings.Builder
	line := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	line("# Written by redis-agent. Do not edit: the agent rewrites it.")
	line("bind %s", c.Bind)
	if t := c.TLS; t != nil && t.Required {
		line("port 0")
	} else {
		line("port %d", c.Port)
	}
	if t := c.TLS; t != nil {
		line("tls-port %d", t.Port)
		line("tls-cert-file %s", quote(t.CertFile))
		line("tls-key-file %s", quote(t.KeyFile))
		line("tls-ca-cert-file %s", quote(t.CAFile))
		// Tenants log in with their password: no client certificates.
		line("tls-auth-clients no")
		line("tls-protocols %s", quote(tlsProtocols))
		line("tls-prefer-server-ciphers yes")
	}
	line("protected-mode yes")
	line("daemonize no")
	// READY=1 to the agent's socket (NOTIFY_SOCKET in the environment)
	// once loaded; without the variable, no supervision.
	line("supervised auto")
	line(`pidfile ""`)
	// The agent recognises its processes by the config path in the title.
	line(`proc-title-template "{title} {listen-addr} {config-file}"`)
	line("dir %s", quote(c.Dir))
	line("logfile %s", quote(c.LogFile))
	line("loglevel notice")
	line("always-show-logo no")
	line("aclfile %s", quote(c.ACLFile))
	line("enable-protected-configs no")
	line("enable-debug-command no")
	line("enable-module-command no")
	line("maxmemory %dmb", c.MemoryMB)
	policy := c.MaxmemoryPolicy
	if policy == "" {
		policy = apitype.DefaultMaxmemoryPolicy
	}
	line("maxmemory-policy %s", policy)
	if mc := c.MaxmemoryClients; mc != "" && mc != "0" {
		line("maxmemory-clients %s", mc)
	}
	if c.MaxClients > 0 {
		line("maxclients %d", c.MaxClients)
	}
	line("databases 16")
	line("tcp-keepalive 60")
	// A move's replica syncs at once: no wait for more replicas.
	line("repl-diskless-sync-delay 0")
	if p := c.ReplicaOf; p != nil {
		line("replicaof %s %d", p.Host, p.Port)
		line("masteruser %s", quote(p.User))
		line("masterauth %s", quote(p.Password))
		line("replica-read-only yes")
		line("replica-serve-stale-data yes")
		if p.TLS {
			line("tls-replication yes")
		}
	}
	switch {
	case apitype.IsAOF(c.Persistence):
		fsync := "everysec"
		if c.Persistence == apitype.PersistenceAOFAlways {
			fsync = "always"
		}
		line("appendonly yes")
		line("appendfsync %s", fsync)
		line("appenddirname %s", quote(AOFDir))
		line(`save ""`)
	case c.Persistence == apitype.PersistenceRDB:
		line("appendonly no")
		line("save 3600 1 300 100 60 10000")
		line(`dbfilename "dump.rdb"`)
	default: // none
		line("appendonly no")
		line(`save ""`)
	}
	return []byte(b.String())
}

func quote(s string) string { return strconv.Quote(s) }

// The multi-part AOF of an instance (Redis 7), as Render names it (the
// appendfilename is Redis's default, appendonly.aof): in
// AOFDir of the data directory, the manifest AOFManifest lists a base and
// incremental files. A base in RDB form (aof-use-rdb-preamble) is a whole
// RDB file.
const (
	AOFDir      = "appendonlydir"
	AOFManifest = "appendonly.aof.manifest"
	AOFBase     = "appendonly.aof.1.base.rdb"
	AOFIncr     = "appendonly.aof.1.incr.aof"
)

// AOFManifestOfBase is a manifest that lists AOFBase and an (empty)
// AOFIncr: an instance started on it loads the base (an RDB) and appends
// to the incremental file, with no manifest of its own to write first.
func AOFManifestOfBase() []byte {
	return []byte("file " + AOFBase + " seq 1 type b\nfile " + AOFIncr + " seq 1 type i\n")
}

// User is one ACL user of an instance.
type User struct {
	Name string
	// PasswordHash is the hex sha256 of the password (HashPassword).
	PasswordHash string
	// Admin users get every command; others get TenantRules, unless Rules
	// says otherwise (the replication user of a move).
	Admin bool
	Rules string
	// Off users exist but cannot log in (a move's source fences its
	// tenants off during the cutover).
	Off bool
}

// onOff is the ACL flag of u.
func (u User) onOff() string {
	if u.Off {
		return "off"
	}
	return "on"
}

// ReplicationRules are the ACL rules of a move's replication user: only
// what a replica sends its primary.
const ReplicationRules = "resetkeys resetchannels -@all +psync +replconf +ping"

// rules returns u's ACL rules.
func (u User) rules() string {
	switch {
	case u.Admin:
		return "~* &* +@all"
	case u.Rules != "":
		return u.Rules
	}
	return TenantRules
}

// TenantRules are the ACL rules of a binding's user: what a managed Redis
// (ElastiCache) gives its users. Every data command on every key and
// channel; of the administrative ones (@admin), what looks at or acts on
// the tenant's own connections and server without reaching the host:
// every CLIENT subcommand (LIST, KILL, NO-EVICT, PAUSE, UNPAUSE, ...),
// SLOWLOG, LATENCY, MONITOR, ROLE, LASTSAVE, MEMORY, INFO; of ACL only
// WHOAMI. Refused, by name so that no category change lets them in:
// CONFIG, DEBUG, MODULE, SHUTDOWN, SAVE, BGSAVE, BGREWRITEAOF, REPLICAOF,
// SLAVEOF, SYNC, PSYNC, REPLCONF, MIGRATE, FAILOVER, and the rest of
// @admin (ACL SETUSER, CLUSTER, PFDEBUG, ...). Every name is one Redis 7.0
// knows: an unknown one would fail the ACL file's load.
const TenantRules = "~* &* +@all -@admin " + TenantAllowed + " -acl +acl|whoami " + TenantRefused

// TenantAllowed are the @admin commands a tenant may run.
const TenantAllowed = "+client +slowlog +latency +monitor +role +lastsave +memory +info"

// TenantRefused are the commands a tenant may not run, named.
const TenantRefused = "-config -debug -module -shutdown -save -bgsave -bgrewriteaof " +
	"-replicaof -slaveof -sync -psync -replconf -migrate -failover"

// RenderACL returns the ACL file for users. The default user is always
// switched off; users are sorted by name so the output is stable.
func RenderACL(users []User) []byte {
	us := append([]User(nil), users...)
	sort.Slice(us, func(i, j int) bool { return us[i].Name < us[j].Name })
	var b strings.Builder
	// Without this line Redis would create "default" with nopass and +@all.
	b.WriteString("user default off resetpass resetkeys resetchannels -@all\n")
	for _, u := range us {
		fmt.Fprintf(&b, "user %s %s #%s %s\n", u.Name, u.onOff(), u.PasswordHash, u.rules())
	}
	return []byte(b.String())
}

// HashPassword returns the hex sha256 of a password, the form the ACL file
// stores.
func HashPassword(password string) string {
	sum := sha256.Sum256([]byte(password))
	return hex.EncodeToString(sum[:])
}

// NewPassword returns a random password of 48 hex characters (192 bits from
// crypto/rand).
func NewPassword() string {
	var b [24]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic("crypto/rand failed: " + err.Error()) // never fails on Linux
	}
	return hex.EncodeToString(b[:])
}

// RenderCandidate returns the redis.conf of a restore's candidate: the
// instance's own config at conf, with the data directory dir (a staged
// one) and no TCP or TLS port, reachable only on the unix socket at
// socket (relative to dir, where Redis binds it: it stays within the 107
// bytes of a socket address however deep dir is). It loads the staged
// data at its start as the instance would, as the instance's users (its
// ACL file); once it has, the agent moves it onto the instance's ports
// and data directory (CONFIG SET port, tls-port, proc-title-template)
// and it is the instance. Its title names this config until then, so an
// agent that restarts knows it for a candidate, not the instance.
func RenderCandidate(conf, dir, socket string) []byte {
	var b strings.Builder
	line := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	line("# A redis-agent restore candidate. Written by redis-agent.")
	line("include %s", quote(conf))
	line("port 0")
	line("tls-port 0")
	line("dir %s", quote(dir))
	line("unixsocket %s", quote(socket))
	line("unixsocketperm 700")
	line(`proc-title-template "{title} {listen-addr} {config-file}"`)
	return []byte(b.String())
}

// InstanceTitle is the proc-title-template of an instance whose config
// is conf, set on a candidate when it becomes the instance (its config
// file is the candidate's): the title Render's template gives.
func InstanceTitle(conf string) string { return "{title} {listen-addr} " + conf }
